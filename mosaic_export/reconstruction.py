"""Reconstruction error of a projection pruned at each level of the ladder (knapsack.LADDER).

For a weight W (out, in) and its calibration inputs X (tokens, in), with H = X^T X, removing the
weights of a mask leaves D = W * mask and the output error ||X D^T||^2 = sum((D H) * D). The mask
at each level is Wanda's (the lowest |W| * ||X|| per output row), so the error is that of the
mask before any update: SparseGPT's updates lower every level's error, so for SparseGPT the
errors are a proxy (its own at 39 levels would cost 39 prunes). Errors are relative to the output's energy
||X W^T||^2 = sum((W H) * W), so that projections of different sizes and scales compare.
"""

from __future__ import annotations

import torch

from .knapsack import LADDER

CHUNK_ELEMENTS = 2 ** 24  # weights per batched matmul (levels x out x in), ~64 MB in float32


@torch.no_grad()
def ladder_errors(weight: torch.Tensor, hessian: torch.Tensor, scores: torch.Tensor) -> list[float]:
    """Relative output error of the Wanda mask at each LADDER level (the first 0); scores: the
    Wanda scores (out, in) of the weight (pod.wanda_scores)."""
    w = weight.float()
    h = hessian.float()
    energy = float(((w @ h) * w).sum().double())
    if energy <= 0:
        return [0.0] * len(LADDER)
    out_features, in_features = w.shape
    order = torch.sort(scores, dim=1, stable=True).indices  # ascending
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(in_features).expand(out_features, -1).contiguous())
    per_chunk = max(1, CHUNK_ELEMENTS // w.numel())
    errors = []
    for start in range(0, len(LADDER), per_chunk):
        ks = torch.tensor([int(round(s * in_features)) for s in LADDER[start:start + per_chunk]])
        d = torch.where(rank.unsqueeze(0) < ks.view(-1, 1, 1), w.unsqueeze(0), 0.0)  # (L, out, in)
        e = ((d.view(-1, in_features) @ h).view_as(d) * d).sum((1, 2), dtype=torch.float64)
        errors.extend((e / energy).tolist())
    return errors
