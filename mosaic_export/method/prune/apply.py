"""Pass 2 over the calibration data (pass 1 is pod.measure; a plan is made from it by planner.py).

apply_plan: the model pruned in place, layer by layer: each layer's statistics are taken on the
outputs of the already-pruned layers before it; then its heads and channels are removed (with
least-squares compensation of o and down) and its kept weights pruned (Wanda or SparseGPT).
"""

from __future__ import annotations

import torch
from torch import nn

from mosaic_export.method.calibration import InputStats, LayerStream
from mosaic_export.method.plan import Plan
from mosaic_export.method.prune.sparsegpt import sparsegpt_prune
from mosaic_export.method.prune.structured import compensate
from mosaic_export.method.prune.wanda import wanda_prune
from mosaic_export.model.arch import ArchSpec
from mosaic_export.model.names import INPUT_GROUP_OF, MLP, PROJECTIONS
from mosaic_export.model.resize import expand_heads, resize_layer, resize_model


@torch.no_grad()
def apply_plan(stream: LayerStream, spec: ArchSpec, plan: Plan) -> None:
    """Pass 2: prune the model in place to the plan, layer by layer: structure first (new shapes,
    o / down compensated for the inputs they lose), then zeros inside the kept weights."""
    shape, settings = plan.shape, plan.settings
    for i, layer in stream.layers("prune"):
        lp = plan.layers[i]
        remove_heads = lp.dims.n_head != shape.n_head
        remove_channels = lp.dims.n_ff != shape.n_ff
        stats = stream.statistics(layer, _hessians_needed(settings, lp, remove_heads, remove_channels))
        if remove_heads or remove_channels:
            _resize(layer, spec, shape, settings, lp, stats, remove_heads, remove_channels)
        if not lp.q_heads and any(lp.ratios[p] for p in MLP):  # the MLP now reads norm(h), not
            stats = stream.statistics(layer, _hessians_needed(settings, lp, False, False))  # h + a
        for p in PROJECTIONS:
            if lp.ratios[p] > 0:
                _sparsify(spec.projection(layer, p), settings.method, stats[INPUT_GROUP_OF[p]],
                          lp.ratios[p])
        stream.advance(layer)


def _hessians_needed(settings, lp, remove_heads: bool, remove_channels: bool) -> set[str]:
    """Input groups whose Hessian the layer's pruning needs: SparseGPT's, and compensation's."""
    wanted = set()
    if settings.method == "sparsegpt" and any(v > 0 for v in lp.ratios.values()):
        wanted |= {"qkv", "o", "gate_up", "down"}
    if settings.compensate and remove_heads and lp.q_heads:
        wanted.add("o")
    if settings.compensate and remove_channels and lp.channels:
        wanted.add("down")
    return wanted


def _resize(layer, spec: ArchSpec, shape, settings, lp, stats: dict, remove_heads: bool,
            remove_channels: bool) -> None:
    """The layer at the plan's sizes; stats restricted to the inputs kept."""
    o_cols = expand_heads(lp.q_heads, shape.head_dim)
    down_cols = torch.tensor(lp.channels, dtype=torch.long)
    o_weight = down_weight = None
    if settings.compensate and remove_heads and lp.q_heads:  # a removed block has nothing to compensate
        o_weight = compensate(spec.projection(layer, "o").weight, stats["o"].hessian, o_cols)
    if settings.compensate and remove_channels and lp.channels:
        down_weight = compensate(spec.projection(layer, "down").weight, stats["down"].hessian,
                                 down_cols)
    resize_layer(layer, spec, shape.head_dim, lp.q_heads, lp.kv_heads, lp.channels,
                 o_weight=o_weight, down_weight=down_weight)
    stats["o"] = _restrict(stats["o"], o_cols)
    stats["down"] = _restrict(stats["down"], down_cols)


def _sparsify(linear: nn.Linear, method: str, stats: InputStats, ratio: float) -> None:
    if method == "wanda":
        linear.weight.data = wanda_prune(linear.weight.data, stats.norm, ratio)
    else:
        linear.weight.data = sparsegpt_prune(linear.weight.data, stats.hessian, ratio)


def _restrict(stats: InputStats, keep: torch.Tensor) -> InputStats:
    """The statistics of the kept input features only (removing a head or channel leaves the
    other features' activations unchanged)."""
    h = stats.hessian[keep][:, keep] if stats.hessian is not None else None
    total = stats.total[keep] if stats.total is not None else None
    return InputStats(stats.sq_norm[keep], h, stats.n_tokens, total)


def resize_to_plan(loaded, plan: Plan) -> None:
    """Structure only: every layer cut to the plan's kept heads and channels, in place, without
    compensation or unstructured pruning. A runtime's speed and memory depend on the sizes alone,
    so this is how other plans are measured cheaply (tools/bench_costmodel.py, the neighbour
    check of the main command)."""
    resize_model(loaded, plan.layers)
