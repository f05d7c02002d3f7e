"""Allocation: one global pruning target -> a ratio per projection of every layer.

- ``uniform``: every projection gets the global target (the "global" baseline of the paper).
- ``layer``: OWL. One outlier ratio per layer (all its projections together); more outliers,
  less pruning; every projection of a layer gets the layer's ratio.
- ``projection``: Mosaic. The OWL rule applied per projection type across layers: q of layer i
  is compared with q of the other layers, down with down, and so on.

The OWL rule: c = (r - min r) / (max r - min r) * 2 * lambda; density d = 1 - S + c - mean(c).
Ratios are then clipped to [0, max_ratio] and shifted so that their mean, weighted by parameter
count, equals the target exactly (the clip would otherwise move the mean).
"""

from __future__ import annotations

import torch

ALLOCATIONS = ("uniform", "layer", "projection")
MAX_RATIO = 0.99


def owl_ratios(outliers: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    """Pruning ratios (n,) from outlier ratios (n,) by OWL's rule; mean equals target."""
    r = outliers.double()
    spread = r.max() - r.min()
    c = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    density = 1.0 - target + c - c.mean()
    return 1.0 - density


def fit_mean(ratios: torch.Tensor, weights: torch.Tensor, target: float,
             lo: float = 0.0, hi: float = MAX_RATIO) -> torch.Tensor:
    """Shift ratios by one offset t so that clip(ratios + t, lo, hi) has weighted mean target.

    The weighted mean of the clipped ratios grows monotonically with t, so bisection finds t.
    """
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside [{lo}, {hi}]")
    r, w = ratios.double(), weights.double()

    def mean_at(t: float) -> float:
        return float((torch.clamp(r + t, lo, hi) * w).sum() / w.sum())

    a, b = lo - float(r.max()) - 1.0, hi - float(r.min()) + 1.0
    for _ in range(200):
        mid = (a + b) / 2
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    return torch.clamp(r + (a + b) / 2, lo, hi)


def allocate(method: str, target: float, lam: float,
             projection_outliers: dict[str, torch.Tensor], layer_outliers: torch.Tensor,
             weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-projection pruning ratios.

    projection_outliers: name -> (n_layers,) outlier ratio of that projection in each layer.
    layer_outliers: (n_layers,) outlier ratio of each whole layer (OWL).
    weights: name -> (n_layers,) parameter count of that projection in each layer.
    Returns name -> (n_layers,) ratios whose mean weighted by ``weights`` equals ``target``.
    """
    names = list(projection_outliers)
    n = len(layer_outliers)
    if method == "uniform":
        raw = {p: torch.full((n,), target, dtype=torch.float64) for p in names}
    elif method == "layer":
        shared = owl_ratios(layer_outliers, target, lam)
        raw = {p: shared.clone() for p in names}
    elif method == "projection":
        raw = {p: owl_ratios(projection_outliers[p], target, lam) for p in names}
    else:
        raise ValueError(f"unknown allocation '{method}', expected one of {ALLOCATIONS}")

    if method == "projection":
        # Each projection type keeps the target as its own mean: the rule redistributes
        # across layers, not between types.
        return {p: fit_mean(raw[p], weights[p], target) for p in names}
    flat = torch.cat([raw[p] for p in names])
    fitted = fit_mean(flat, torch.cat([weights[p].double() for p in names]), target)
    return {p: fitted[i * n:(i + 1) * n] for i, p in enumerate(names)}
