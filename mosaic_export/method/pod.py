"""Projection outlier distribution (POD).

Per projection p of layer i, every weight gets the Wanda score A_jk = |W_jk| * ||X_k||_2, where
||X_k||_2 is the norm of input feature k over all calibration tokens. The outlier ratio is the
fraction of scores above M times their mean. Many outliers mark a projection that is sensitive
to pruning; the allocation prunes it less.

``measure`` is pass 1 over the calibration data: the dense model, layer by layer, its outlier
ratios (per projection, per layer, per attention / MLP group) and the activation-aware scores of
its heads and channels, one LayerMeasurement a layer; with ``errors``, also each projection's
relative output error at every ladder level ("projection"), and o's and down's at every head
layout and MLP channel level with compensation ("structure"; reconstruction.py, for the ``error``
allocation: PruneSettings.error_kinds says which).
A plan is made from these (planner.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mosaic_export.method.blocks import block_energy
from mosaic_export.method.calibration import LayerStream
from mosaic_export.method.prune.structured import (
    column_scores,
    head_scores,
    magnitude_channel_scores,
    magnitude_head_scores,
)
from mosaic_export.method.reconstruction import channel_errors, head_option_errors, ladder_errors
from mosaic_export.model.arch import ArchSpec, ModelShape
from mosaic_export.model.names import ATTENTION, INPUT_GROUP_OF, INPUT_GROUPS, MLP, PROJECTIONS


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


@dataclass
class LayerMeasurement:
    """What pass 1 (dense model, calibration data) learns about one layer."""

    projection_outliers: dict[str, float]  # POD: outlier ratio per projection
    layer_outliers: float  # all projections of the layer together (OWL)
    group_outliers: dict[str, float]  # "attn" (q, k, v, o) and "mlp" (gate, up, down)
    head_scores: dict[str, torch.Tensor]  # per STRUCTURED_SCORES kind: (n_head,) per query head
    channel_scores: dict[str, torch.Tensor]  # per kind: (n_ff,) per MLP channel
    projection_errors: dict[str, list[float]] | None = None  # per projection, at each SPARSITY_LEVELS level
    # "attn": o's error at each head_options layout; "mlp": down's at each STRUCTURE_LADDER level
    group_errors: dict[str, list[float]] | None = None
    block_scores: dict[str, float] | None = None  # what each block writes (blocks.py); Llama-like only


@torch.no_grad()
def measure(stream: LayerStream, spec: ArchSpec, shape: ModelShape,
            outlier_m: float, errors: frozenset[str] | set[str] = frozenset()) -> list[LayerMeasurement]:
    """Pass 1 over the dense model; with ``errors`` ("projection", "structure"), those errors too
    (the Hessians they need are taken: every input group's for "projection", o's and down's for
    "structure")."""
    hessians = set(INPUT_GROUPS) if "projection" in errors else {"o", "down"} if errors else set()
    measured = []
    for _, layer in stream.layers("measure (dense)"):
        with block_energy(layer, spec) if spec.supports_blocks() else contextlib.nullcontext() as energy:
            stats = stream.statistics(layer, hessians, advance=True)
        scores = {p: wanda_scores(spec.projection(layer, p).weight,
                                  stats[INPUT_GROUP_OF[p]].norm) for p in PROJECTIONS}
        w = {p: spec.projection(layer, p).weight for p in PROJECTIONS}
        heads = head_scores(w["o"], stats["o"].sq_norm, shape.head_dim)
        channels = column_scores(w["down"], stats["down"].sq_norm)
        measured.append(LayerMeasurement(
            projection_outliers={p: outlier_ratio(scores[p], outlier_m) for p in PROJECTIONS},
            layer_outliers=outlier_ratio([scores[p] for p in PROJECTIONS], outlier_m),
            group_outliers={"attn": outlier_ratio([scores[p] for p in ATTENTION], outlier_m),
                            "mlp": outlier_ratio([scores[p] for p in MLP], outlier_m)},
            head_scores={"activation": heads,
                         "magnitude": magnitude_head_scores(w["q"], w["o"], shape.head_dim)},
            channel_scores={"activation": channels,
                            "magnitude": magnitude_channel_scores(w["gate"], w["up"], w["down"])},
            projection_errors={p: ladder_errors(w[p], stats[INPUT_GROUP_OF[p]].hessian, scores[p])
                               for p in PROJECTIONS} if "projection" in errors else None,
            group_errors={"attn": head_option_errors(w["o"], stats["o"].hessian, heads, shape.n_kv,
                                                     shape.head_dim),
                          "mlp": channel_errors(w["down"], stats["down"].hessian, channels)}
            if "structure" in errors else None,
            block_scores=energy.scores() if energy is not None else None,
        ))
    return measured
