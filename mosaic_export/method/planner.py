"""Planning: a Plan (plan.py) made from pass-1 measurements (pod.py) and the settings. The
structured share is allocated over layers and over the attention / MLP groups, met per layer by
the nearest valid GQA head layout and MLP channel counts shifted so the total lands on the target
(with the ``error`` rule, the head layouts and MLP widths of least measured error instead); the
rest is allocated as unstructured ratios per projection (allocation.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.method.allocation import MAX_RATIO, NEEDS_ERRORS, allocate, fit_mean
from mosaic_export.method.blocks import choose_blocks
from mosaic_export.method.knapsack import integer_units, solve_levels, window
from mosaic_export.method.plan import LayerPlan, Plan, PruneSettings, weight_count
from mosaic_export.method.pod import LayerMeasurement
from mosaic_export.method.prune.structured import choose_channels, choose_heads, head_options
from mosaic_export.method.reconstruction import STRUCTURE_LADDER
from mosaic_export.model.arch import LayerDims, ModelShape
from mosaic_export.model.names import ATTENTION, MLP, PROJECTIONS


def make_plan(shape: ModelShape, source: str, measured: list[LayerMeasurement],
              settings: PruneSettings) -> Plan:
    settings.validate()
    n = shape.n_layers
    pod = {
        "projection": {p: [m.projection_outliers[p] for m in measured] for p in PROJECTIONS},
        "layer": [m.layer_outliers for m in measured],
        "group": {g: [m.group_outliers[g] for m in measured] for g in ("attn", "mlp")},
    }
    dense = shape.dense_dims
    decoder_dense = n * shape.layer_params(dense)
    removed_target = settings.sparsity * decoder_dense

    # 1. Structured part: per-layer head layouts and channel counts, or whole blocks.
    dims = _structure(shape, pod, measured, settings, settings.structured_fraction * removed_target)
    layers = []
    for m, d in zip(measured, dims, strict=True):
        if d.n_head == 0:  # a removed attention block
            heads_q, heads_kv = [], []
        elif d.n_head == shape.n_head:
            heads_q, heads_kv = list(range(shape.n_head)), list(range(shape.n_kv))
        else:
            heads = choose_heads(m.head_scores[settings.structured_scores], shape.n_kv, d.n_kv,
                                 d.n_head // d.n_kv)
            heads_q, heads_kv = heads.q_heads, heads.kv_heads
        channels = (list(range(d.n_ff)) if d.n_ff in (0, shape.n_ff)
                    else choose_channels(m.channel_scores[settings.structured_scores], d.n_ff))
        layers.append(LayerPlan(heads_q, heads_kv, channels, {p: 0.0 for p in PROJECTIONS}))

    # 2. Unstructured part: what is left of the target, as zeros in the kept weights.
    removed_structured = decoder_dense - sum(shape.layer_params(lp.dims) for lp in layers)
    removed_left = removed_target - removed_structured
    weights = {p: torch.tensor([float(weight_count(shape, lp.dims, p)) for lp in layers],
                               dtype=torch.float64) for p in PROJECTIONS}
    kept_weights = float(sum(w.sum() for w in weights.values()))
    ratio_u = removed_left / kept_weights
    if ratio_u > 1e-9:
        if ratio_u > MAX_RATIO:
            raise UserError(f"sparsity {settings.sparsity} cannot be reached: the unstructured part "
                            f"would need {ratio_u:.1%} of the kept weights")
        errors, rule = None, settings.allocation
        if all(m.projection_errors is not None for m in measured):
            errors = {p: torch.tensor([m.projection_errors[p] for m in measured], dtype=torch.float64)
                      for p in PROJECTIONS}
        elif rule in NEEDS_ERRORS and settings.structured_fraction == 1:
            rule = "uniform"  # a structured plan's rounding remainder: its errors were not measured
        ratios = allocate(rule, ratio_u, settings.lam,
                          {p: torch.tensor(pod["projection"][p]) for p in PROJECTIONS},
                          torch.tensor(pod["layer"]), weights, errors)
        for i, lp in enumerate(layers):  # a removed block's cells weigh nothing: no ratio
            lp.ratios = {p: float(ratios[p][i]) if weights[p][i] > 0 else 0.0 for p in PROJECTIONS}
    plan = Plan(model={"source": source, "shape": shape.to_dict()}, settings=settings, pod=pod,
                layers=layers)
    plan.check()
    return plan


def _structure(shape: ModelShape, pod: dict, measured: list[LayerMeasurement], settings: PruneSettings,
               removed_target: float) -> list[LayerDims]:
    """Each layer's sizes after the structured part of the plan."""
    if removed_target <= 0:
        return [shape.dense_dims] * shape.n_layers
    if settings.structure == "blocks":
        if any(m.block_scores is None for m in measured):
            raise UserError("whole-block removal needs Llama-like layers (one norm before each block)")
        return choose_blocks(shape, [m.block_scores for m in measured], removed_target)
    return _structured_dims(shape, pod, measured, settings, removed_target)


def _group_params(shape: ModelShape, dims: LayerDims, group: tuple[str, ...]) -> int:
    return sum(shape.projection_params(p, dims) for p in group)


def _structured_dims(shape: ModelShape, pod: dict, measured: list[LayerMeasurement],
                     settings: PruneSettings, removed_target: float) -> list[LayerDims]:
    n, dense, align = shape.n_layers, shape.dense_dims, settings.alignment
    attn_dense, mlp_dense = _group_params(shape, dense, ATTENTION), _group_params(shape, dense, MLP)
    ratio = removed_target / (n * (attn_dense + mlp_dense))
    if ratio > MAX_RATIO:
        raise UserError(f"cannot remove {removed_target:.0f} parameters by structure: that is "
                        f"{ratio:.0%} of all projections")
    aligned_dense = (shape.n_head * shape.head_dim) % align == 0
    options = [(g, q) for g, q in head_options(shape.n_head, shape.n_kv)
               if (not aligned_dense or (g * q * shape.head_dim) % align == 0)
               and (g == shape.n_kv or not settings.keep_kv_heads)]
    if settings.allocation == "error":
        attn_dims, wanted_mlp = _error_groups(shape, measured, options, ratio, settings.lam)
    else:
        group_ratios = allocate(
            settings.allocation, ratio, settings.lam,
            {g: torch.tensor(pod["group"][g]) for g in ("attn", "mlp")}, torch.tensor(pod["layer"]),
            {"attn": torch.full((n,), float(attn_dense)), "mlp": torch.full((n,), float(mlp_dense))})
        # Attention: the valid GQA layout nearest to each layer's ratio (ties: keep more).
        attn_dims = []
        for i in range(n):
            want = (1 - float(group_ratios["attn"][i])) * attn_dense
            g, q = min(options, key=lambda o: (abs(_kept_attn(shape, o) - want), -o[0] * o[1], -o[0]))
            attn_dims.append((g * q, g))
        wanted_mlp = group_ratios["mlp"]
    attn_removed = sum(attn_dense - _group_params(shape, LayerDims(h, kv, dense.n_ff), ATTENTION)
                       for h, kv in attn_dims)

    # MLP: shift the allocated channel ratios together so the total lands on the target.
    mlp_removed_target = max(0.0, removed_target - attn_removed)
    mlp_ratio = mlp_removed_target / (n * mlp_dense)
    max_mlp_ratio = 1 - align / shape.n_ff
    if mlp_ratio > max_mlp_ratio:
        raise UserError(f"cannot remove {removed_target:.0f} parameters by structure with channel "
                        f"alignment {align}")
    mlp_ratios = fit_mean(wanted_mlp, torch.ones(n), mlp_ratio, hi=max_mlp_ratio)
    units = [(1 - float(r)) * shape.n_ff / align for r in mlp_ratios]  # kept, in aligned blocks
    if settings.allocation == "uniform":  # one width for all: the layers keep one size
        kept_units = [min(max(1, round(units[0])), shape.n_ff // align)] * n
    else:
        kept_units = _round_preserving_sum(units, lo=1, hi=shape.n_ff // align)
    return [LayerDims(h, kv, u * align) for (h, kv), u in zip(attn_dims, kept_units, strict=True)]


def _kept_attn(shape: ModelShape, option: tuple[int, int]) -> int:
    """Attention parameters of a layer keeping (KV groups, query heads per group)."""
    g, q = option
    return _group_params(shape, LayerDims(g * q, g, shape.n_ff), ATTENTION)


def _error_groups(shape: ModelShape, measured: list[LayerMeasurement], options: list[tuple[int, int]],
                  ratio: float, spread: float) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The ``error`` rule for structure: one head layout and one MLP channel level per layer,
    removing at least ``ratio`` of the projections' parameters at the least total relative error
    (o's and down's, compensated, measured in pass 1; an exact knapsack), each cell's share removed
    within ``spread`` of the ratio (the shares nearest below and above it always allowed). Returns
    each layer's (n_head, n_kv) and wanted MLP ratios; the caller lands the MLP on the target."""
    if any(m.group_errors is None for m in measured):
        raise UserError("allocation 'error' needs the measured errors of pass 1 "
                        "(measure with errors={'structure'})")
    n, dense = shape.n_layers, shape.dense_dims
    attn_dense, mlp_dense = _group_params(shape, dense, ATTENTION), _group_params(shape, dense, MLP)
    every = head_options(shape.n_head, shape.n_kv)
    # least removed first, so that the knapsack's ties go to the layout that keeps more
    options = sorted(options, key=lambda o: (attn_dense - _kept_attn(shape, o), -o[0] * o[1], -o[0]))
    attn_cost = [attn_dense - _kept_attn(shape, o) for o in options]
    attn_share = [c / attn_dense for c in attn_cost]
    mlp_share = list(STRUCTURE_LADDER)
    mlp_cost = [mlp_dense - _group_params(shape, LayerDims(dense.n_head, dense.n_kv,
                                                           shape.n_ff - int(round(s * shape.n_ff))), MLP)
                for s in mlp_share]
    width = max(len(options), len(mlp_share))
    errors = np.zeros((2 * n, width))
    costs = np.zeros((2 * n, width), dtype=np.int64)
    allowed = np.zeros((2 * n, width), dtype=bool)
    for i, m in enumerate(measured):
        errors[i, :len(options)] = [m.group_errors["attn"][every.index(o)] for o in options]
        errors[n + i, :len(mlp_share)] = m.group_errors["mlp"]
    costs[:n, :len(options)] = attn_cost
    costs[n:, :len(mlp_share)] = mlp_cost
    allowed[:n, :len(options)] = window(attn_share, ratio, spread)
    allowed[n:, :len(mlp_share)] = window(mlp_share, ratio, spread)
    units, unit = integer_units(costs)
    budget = math.ceil(ratio * n * (attn_dense + mlp_dense) / unit - 1e-9)
    levels = solve_levels(errors, units, budget, allowed, cap=True)  # capped: the MLP landing does the rest
    attn = [(options[k][0] * options[k][1], options[k][0]) for k in levels[:n]]
    return attn, torch.tensor([mlp_share[k] for k in levels[n:]], dtype=torch.float64)


def _round_preserving_sum(values: list[float], lo: int, hi: int) -> list[int]:
    """Integers within [lo, hi], each the floor or ceiling of its value, summing to round(sum)
    where the bounds allow (largest remainders round up)."""
    floors = [min(hi, max(lo, int(v))) for v in values]
    short = int(round(sum(values))) - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - int(values[i])), i))
    for i in order:
        if short <= 0:
            break
        if floors[i] < hi:
            floors[i] += 1
            short -= 1
    return floors


def layers_may_differ(settings: PruneSettings, plan: Plan | None = None) -> bool:
    """Whether the plan (given, or to be made with these settings) may give layers different
    sizes: only the uniform rule keeps every layer the same, and not with whole blocks."""
    if plan is not None:
        return len({lp.dims for lp in plan.layers}) > 1
    return settings.structured_fraction > 0 and (settings.allocation != "uniform"
                                                 or settings.structure == "blocks")
