"""Allocation: one global pruning target -> a ratio per projection of every layer.

- ``uniform``: every projection gets the global target (the "global" baseline of the paper).
- ``layer``: OWL. One outlier ratio per layer (all its projections together); more outliers,
  less pruning; every projection of a layer gets the layer's ratio.
- ``projection``: Mosaic. The OWL rule applied per projection type across layers: q of layer i
  is compared with q of the other layers, down with down, and so on; each type keeps the target
  as its own mean.
- ``joint``: the OWL rule over every layer x type cell at once: pruning can move between types.
- ``layer+type``: OWL's layer vector plus a per-type offset from each type's mean outlier ratio
  (the authors' layer-vector-plus-type-offset reading of Mosaic).
- ``error``: data-driven. Each projection's relative output error is measured on the calibration
  data at a ladder of ratios (reconstruction.py); one ratio per projection is chosen to remove the
  target's parameters at the least total error (an exact knapsack, knapsack.py), each within
  lambda of the target. Needs the errors from the measure pass. For the structured part of a
  plan the same rule picks each layer's head layout and MLP width (planner._error_groups).

Rules are registered by name (``register``); a plan names the rule it was made with. A rule
reads its evidence (outlier ratios; measured errors where the rule needs them) from ``Evidence``.

The OWL rule: c = (r - min r) / (max r - min r) * 2 * lambda; density d = 1 - S + c - mean(c).
Ratios are then clipped to [0, max_ratio] and shifted so that their mean, weighted by parameter
count, equals the target exactly (the clip would otherwise move the mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mosaic_export.method.knapsack import solve_ratios

MAX_RATIO = 0.99
NEEDS_ERRORS = ("error",)  # rules that need the measured errors of pass 1


@dataclass(frozen=True)
class Evidence:
    """What a rule allocates from, per cell (each tensor (n_layers,) or (n_layers, levels))."""

    projection_outliers: dict[str, torch.Tensor]  # POD: name -> outlier ratio per layer
    layer_outliers: torch.Tensor  # OWL: one ratio per layer
    projection_errors: dict[str, torch.Tensor] | None = None  # name -> (n_layers, ladder levels)


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


Rule = Callable[[float, float, Evidence, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
_RULES: dict[str, Rule] = {}


def register(name: str, rule: Rule) -> Rule:
    """Add an allocation rule by name: rule(target, lam, evidence, weights) -> name ->
    (n_layers,) ratios (see allocate). Checked here: a name is registered once."""
    if name in _RULES:
        raise ValueError(f"allocation '{name}' is already registered")
    _RULES[name] = rule
    return rule


def names() -> tuple[str, ...]:
    return tuple(_RULES)


def allocate(method: str, target: float, lam: float,
             projection_outliers: dict[str, torch.Tensor], layer_outliers: torch.Tensor,
             weights: dict[str, torch.Tensor],
             projection_errors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-projection pruning ratios by the rule registered as ``method``.

    projection_outliers: name -> (n_layers,) outlier ratio of that projection in each layer.
    layer_outliers: (n_layers,) outlier ratio of each whole layer (OWL).
    weights: name -> (n_layers,) parameter count of that projection in each layer.
    projection_errors: name -> (n_layers, levels) relative error at each knapsack.SPARSITY_LEVELS level
    (the rules in NEEDS_ERRORS need them).
    Returns name -> (n_layers,) ratios whose mean weighted by ``weights`` equals ``target``.
    """
    if method not in _RULES:
        raise ValueError(f"unknown allocation '{method}', expected one of {names()}")
    if method in NEEDS_ERRORS and projection_errors is None:
        raise ValueError(f"allocation '{method}' needs the measured errors of each projection")
    evidence = Evidence(projection_outliers, layer_outliers, projection_errors)
    return _RULES[method](target, lam, evidence, weights)


def _fit_all(raw: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], target: float):
    """One shift for every layer x type cell: the target is the mean over all of them, so a rule
    can move pruning from one projection type to another."""
    names_, n = list(raw), len(next(iter(raw.values())))
    flat = torch.cat([raw[p] for p in names_])
    fitted = fit_mean(flat, torch.cat([weights[p].double() for p in names_]), target)
    return {p: fitted[i * n:(i + 1) * n] for i, p in enumerate(names_)}


def uniform(target, lam, ev: Evidence, weights):
    n = len(ev.layer_outliers)
    return _fit_all({p: torch.full((n,), target, dtype=torch.float64) for p in ev.projection_outliers},
                    weights, target)


def layer(target, lam, ev: Evidence, weights):
    """OWL: every projection of a layer gets the layer's ratio."""
    shared = owl_ratios(ev.layer_outliers, target, lam)
    return _fit_all({p: shared.clone() for p in ev.projection_outliers}, weights, target)


def projection(target, lam, ev: Evidence, weights):
    """OWL's rule per projection type across layers; each type keeps the target as its own mean:
    the rule redistributes across layers, not between types."""
    return {p: fit_mean(owl_ratios(ev.projection_outliers[p], target, lam), weights[p], target)
            for p in ev.projection_outliers}


def joint(target, lam, ev: Evidence, weights):
    """OWL's rule over all layer x type cells at once (one normalisation, one mean): pruning moves
    between types as well as between layers."""
    names_, n = list(ev.projection_outliers), len(ev.layer_outliers)
    raw = owl_ratios(torch.cat([ev.projection_outliers[p].double() for p in names_]), target, lam)
    return _fit_all({p: raw[i * n:(i + 1) * n] for i, p in enumerate(names_)}, weights, target)


def layer_plus_type(target, lam, ev: Evidence, weights):
    """OWL's layer vector plus a per-type offset from each type's mean outlier ratio (the offsets
    by OWL's rule around 0), one mean over all cells."""
    names_ = list(ev.projection_outliers)
    base = owl_ratios(ev.layer_outliers, target, lam)
    offset = owl_ratios(torch.stack([ev.projection_outliers[p].double().mean() for p in names_]), 0.0, lam)
    return _fit_all({p: base + offset[i] for i, p in enumerate(names_)}, weights, target)


def error(target, lam, ev: Evidence, weights):
    """Data-driven: the ladder level of every cell that removes the target at the least total
    relative error (knapsack.solve_ratios, each within lambda of the target), then one shift so
    the mean is the target exactly."""
    names_, n = list(ev.projection_errors), len(ev.layer_outliers)
    chosen = solve_ratios(torch.cat([ev.projection_errors[p].double() for p in names_]),
                          torch.cat([weights[p].double() for p in names_]), target, lam)
    return _fit_all({p: chosen[i * n:(i + 1) * n] for i, p in enumerate(names_)}, weights, target)


for _name, _rule in (("uniform", uniform), ("layer", layer), ("projection", projection),
                     ("joint", joint), ("layer+type", layer_plus_type), ("error", error)):
    register(_name, _rule)
ALLOCATIONS = names()  # the built-in rules
