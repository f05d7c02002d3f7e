"""Structured pruning: remove whole attention heads and MLP channels, then rebuild smaller Linears.

Attention under grouped-query attention (GQA): query head h reads key/value head h // r, with
r = n_head / n_head_kv. A layer keeps a set of KV groups and, in every kept group, the same number
of query heads, so the layer stays a valid GQA layer (n_head a multiple of n_head_kv). Removing
query head h removes rows of q and columns of o; removing a KV group removes rows of k and v too.

MLP (gated): channel j is row j of gate and up and column j of down.

Scores are activation-aware: a head or channel is worth what it adds to its consumer's output,
||W_consumer[:, cols]||^2 * ||X_cols||^2 summed over its columns (consumer: o or down).
The consumer is then compensated by least squares on calibration activations, so the kept
columns take over what the removed ones did as far as a linear map can.

Magnitude scores (the coarse-grained baseline, LLM-Pruner-like without its fine-tuning) look at
the weights alone: the squared norm of every weight the head or channel owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def column_scores(consumer_weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """||W[:, c]||^2 * ||X_c||^2 per input column c: consumer_weight (out, in) -> (in,)."""
    return (consumer_weight.double() ** 2).sum(0) * input_sq_norm.double()


def head_scores(o_weight: torch.Tensor, o_input_sq_norm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Score of each query head (n_head,) from the o projection and its input statistics."""
    return column_scores(o_weight, o_input_sq_norm).view(-1, head_dim).sum(1)


def magnitude_head_scores(q_weight: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight-only score of each query head (n_head,): its q rows and o columns, squared norm."""
    rows = (q_weight.double() ** 2).sum(1).view(-1, head_dim).sum(1)
    cols = (o_weight.double() ** 2).sum(0).view(-1, head_dim).sum(1)
    return rows + cols


def magnitude_channel_scores(gate_weight: torch.Tensor, up_weight: torch.Tensor,
                             down_weight: torch.Tensor) -> torch.Tensor:
    """Weight-only score of each MLP channel (n_ff,): its gate and up rows and down column."""
    return ((gate_weight.double() ** 2).sum(1) + (up_weight.double() ** 2).sum(1)
            + (down_weight.double() ** 2).sum(0))


@dataclass(frozen=True)
class HeadChoice:
    kv_heads: list[int]  # kept KV heads, ascending
    q_heads: list[int]  # kept query heads (original indices), grouped by KV head, ascending


def head_options(n_head: int, n_kv: int) -> list[tuple[int, int]]:
    """Every valid (kept KV groups, kept query heads per group), at least one head."""
    r = n_head // n_kv
    return [(g, q) for g in range(1, n_kv + 1) for q in range(1, r + 1)]


def choose_heads(scores: torch.Tensor, n_kv: int, n_groups: int, q_per_group: int) -> HeadChoice:
    """The best n_groups KV groups, each keeping its best q_per_group query heads.

    A group is worth the sum of its best q_per_group head scores.
    """
    n_head = scores.numel()
    r = n_head // n_kv
    per_group = scores.view(n_kv, r)
    best_in_group = torch.sort(per_group, dim=1, descending=True, stable=True)
    group_value = best_in_group.values[:, :q_per_group].sum(1)
    groups = sorted(torch.sort(group_value, descending=True, stable=True).indices[:n_groups].tolist())
    q_heads = []
    for g in groups:
        local = sorted(best_in_group.indices[g, :q_per_group].tolist())
        q_heads.extend(g * r + j for j in local)
    return HeadChoice(kv_heads=groups, q_heads=q_heads)


def choose_channels(scores: torch.Tensor, n_keep: int) -> list[int]:
    """The n_keep best channels, ascending."""
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:n_keep].tolist())


def compensate(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
               damp: float = 0.01) -> torch.Tensor:
    """Least-squares consumer weights over the kept inputs.

    Minimises ||X W^T - X_K W'^T|| over W' (out, |K|) with H = X^T X (in, in):
    W' = W H[:, K] (H[K, K] + damp * mean(diag H[K, K]) I)^-1.

    Memory: the kept rows of H in float64 (|K| x in x 8 bytes), then H[K, K] and its factor
    (2 x |K|^2 x 8); never the whole of H in float64 nor an identity beside it (for
    Llama-3.1-8B's down projection, 14,336 inputs, 80% kept, that was about 6 GB at once).
    """
    rows = hessian[keep].double()  # H[K, :]
    rhs = rows @ weight.double().T  # (|K|, out) = H[K, :] W^T
    H_kk = rows[:, keep]
    del rows
    H_kk.diagonal().add_(damp * torch.mean(torch.diag(H_kk)).clamp_min(1e-12))
    solution = torch.linalg.solve(H_kk, rhs)  # W'^T
    return solution.T.to(weight.dtype).contiguous()


