"""Projection outlier distribution (POD).

Per projection p of layer i, every weight gets the Wanda score A_jk = |W_jk| * ||X_k||_2, where
||X_k||_2 is the norm of input feature k over all calibration tokens. The outlier ratio is the
fraction of scores above M times their mean. Many outliers mark a projection that is sensitive
to pruning; the allocation prunes it less.
"""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """A = |W| * ||X||: weight (out, in), input_norm (in,) -> (out, in)."""
    return weight.abs() * input_norm.unsqueeze(0)


def outlier_ratio(scores: list[torch.Tensor] | torch.Tensor, m: float) -> float:
    """Fraction of scores above m * mean, the mean taken over all given matrices together.

    One matrix gives a projection's ratio; several (all of a layer) give OWL's layer ratio.
    """
    if isinstance(scores, torch.Tensor):
        scores = [scores]
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    outliers = sum(int((s > threshold).sum()) for s in scores)
    return outliers / count
