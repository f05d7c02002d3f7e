"""Wanda (Sun et al., 2023): prune the weights with the smallest |W_jk| * ||X_k||_2, per output row."""

from __future__ import annotations

import torch

from mosaic_export.method.pod import wanda_scores


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (out, in) of the weights to remove: round(ratio * in) per output row."""
    out_features, in_features = weight.shape
    k = int(round(ratio * in_features))
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if k <= 0:
        return mask
    scores = wanda_scores(weight, input_norm)
    # Stable sort on (score, column) so ties are broken the same way on every run.
    idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    mask.scatter_(1, idx, True)
    return mask


def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """A copy of weight (out, in) with the Wanda mask applied."""
    return weight.masked_fill(wanda_mask(weight, input_norm, ratio), 0.0)
