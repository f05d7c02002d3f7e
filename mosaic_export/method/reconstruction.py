"""Reconstruction error of a projection pruned at each level of the ladder (knapsack.SPARSITY_LEVELS).

For a weight W (out, in) and its calibration inputs X (tokens, in), with H = X^T X, removing the
weights of a mask leaves D = W * mask and the output error ||X D^T||^2 = sum((D H) * D). The mask
at each level is Wanda's (the lowest |W| * ||X|| per output row), so the error is that of the
mask before any update: SparseGPT's updates lower every level's error, so for SparseGPT the
errors are a proxy (its own at 39 levels would cost 39 prunes). Errors are relative to the output's energy
||X W^T||^2 = sum((W H) * W), so that projections of different sizes and scales compare.

The same for structure (``head_option_errors``, ``channel_errors``): removing query heads or MLP
channels removes input columns of o or down, and the kept columns are compensated by least
squares (prune.structured.compensate), so the error at each option is that of the compensated
consumer, ||X W^T - X_K W'^T||^2, relative to the same energy. Heads and channels are taken in
the order the plan takes them (choose_heads, choose_channels on the activation scores).
"""

from __future__ import annotations

import torch

from mosaic_export.method.knapsack import SPARSITY_LEVELS
from mosaic_export.method.prune.structured import choose_channels, choose_heads, compensate, head_options
from mosaic_export.model.resize import expand_heads

STRUCTURE_LADDER = tuple(round(i * 0.05, 4) for i in range(20))  # MLP channels removed: 0 .. 0.95

CHUNK_ELEMENTS = 2 ** 24  # weights per batched matmul (levels x out x in), ~64 MB in float32


@torch.no_grad()
def ladder_errors(weight: torch.Tensor, hessian: torch.Tensor, scores: torch.Tensor) -> list[float]:
    """Relative output error of the Wanda mask at each SPARSITY_LEVELS level (the first 0); scores: the
    Wanda scores (out, in) of the weight (pod.wanda_scores)."""
    w = weight.float()
    h = hessian.float()
    energy = _energy(w, h)
    if energy <= 0:
        return [0.0] * len(SPARSITY_LEVELS)
    out_features, in_features = w.shape
    order = torch.sort(scores, dim=1, stable=True).indices  # ascending
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(in_features).expand(out_features, -1).contiguous())
    per_chunk = max(1, CHUNK_ELEMENTS // w.numel())
    errors = []
    for start in range(0, len(SPARSITY_LEVELS), per_chunk):
        ks = torch.tensor([int(round(s * in_features)) for s in SPARSITY_LEVELS[start:start + per_chunk]])
        d = torch.where(rank.unsqueeze(0) < ks.view(-1, 1, 1), w.unsqueeze(0), 0.0)  # (L, out, in)
        e = ((d.view(-1, in_features) @ h).view_as(d) * d).sum((1, 2), dtype=torch.float64)
        errors.extend((e / energy).tolist())
    return errors


@torch.no_grad()
def removal_error(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> float:
    """Relative output error of ``weight`` (out, in) reading only the ``keep`` inputs, compensated
    by least squares as the plan does it (compensate); an empty ``keep`` loses the whole output."""
    w = weight.float()
    h = hessian.float()
    energy = _energy(w, h)
    if energy <= 0 or keep.numel() == w.shape[1]:
        return 0.0
    if keep.numel() == 0:
        return 1.0
    d = w.clone()
    d[:, keep] -= compensate(w, h, keep).float()
    return _energy(d, h) / energy


def _energy(w: torch.Tensor, h: torch.Tensor) -> float:
    """||X W^T||^2 = sum((W H) * W) for H = X^T X."""
    return float(((w @ h) * w).sum().double())


def head_option_errors(o_weight: torch.Tensor, o_hessian: torch.Tensor, scores: torch.Tensor,
                       n_kv: int, head_dim: int) -> list[float]:
    """Relative error of o at every head_options layout (kept KV groups, query heads per group)."""
    errors = []
    for groups, per_group in head_options(scores.numel(), n_kv):
        heads = choose_heads(scores, n_kv, groups, per_group).q_heads
        errors.append(removal_error(o_weight, o_hessian, expand_heads(heads, head_dim)))
    return errors


def channel_errors(down_weight: torch.Tensor, down_hessian: torch.Tensor,
                   scores: torch.Tensor) -> list[float]:
    """Relative error of down with each STRUCTURE_LADDER share of its channels removed."""
    n_ff = scores.numel()
    return [removal_error(down_weight, down_hessian,
                          torch.tensor(choose_channels(scores, n_ff - int(round(level * n_ff))),
                                       dtype=torch.long))
            for level in STRUCTURE_LADDER]
