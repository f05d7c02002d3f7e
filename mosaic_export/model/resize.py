"""Resizing: a decoder layer rebuilt at its own head and channel counts. The one home for it:
pruning (prune/apply.py), the cheap structure-only resize of a plan, the stand-in sizes of
`profile detect` and the reload of a resized checkpoint all call resize_model or resize_layer.

A layer keeps a set of KV groups and the same number of query heads in each, so it stays a valid
grouped-query layer. The current sizes are read back from the modules themselves (layer_dims):
nothing else records them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from mosaic_export.model.arch import LayerDims


def expand_heads(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row/column indices of the given heads: [h*head_dim, ..., h*head_dim + head_dim - 1]."""
    return torch.tensor(list(itertools.chain.from_iterable(
        range(h * head_dim, (h + 1) * head_dim) for h in heads)), dtype=torch.long)


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping the given output rows and input columns (or taking ``weight``)."""
    w = linear.weight.data
    if weight is None:
        weight = w if rows is None else w[rows]
        weight = weight if cols is None else weight[:, cols]
    bias = None
    if linear.bias is not None:
        bias = linear.bias.data if rows is None else linear.bias.data[rows]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=w.device, dtype=w.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def resize_layer(layer: nn.Module, spec, head_dim: int, q_heads: list[int], kv_heads: list[int],
                 channels: list[int], o_weight: torch.Tensor | None = None,
                 down_weight: torch.Tensor | None = None) -> None:
    """Rebuild a decoder layer's projections keeping the given heads and channels, in place.

    q_heads must be grouped by KV head, the same number per kept KV head. o_weight / down_weight
    (already restricted to the kept columns) replace the sliced consumer weights when given,
    e.g. after least-squares compensation.
    """
    if not channels and q_heads:
        raise ValueError("a layer without its MLP keeps no attention either (llama.cpp skips it whole)")
    ch = torch.tensor(channels, dtype=torch.long)
    new = {}
    if channels and not spec.absent(layer, "mlp"):
        new.update(gate=sliced_linear(spec.projection(layer, "gate"), rows=ch),
                   up=sliced_linear(spec.projection(layer, "up"), rows=ch),
                   down=sliced_linear(spec.projection(layer, "down"), cols=ch, weight=down_weight))
    if q_heads and len(q_heads) % len(kv_heads):
        raise ValueError(f"expected the query heads to split evenly over {len(kv_heads)} KV heads, "
                         f"got {len(q_heads)}")
    if q_heads:
        q_idx, kv_idx = expand_heads(q_heads, head_dim), expand_heads(kv_heads, head_dim)
        new.update(q=sliced_linear(spec.projection(layer, "q"), rows=q_idx),
                   k=sliced_linear(spec.projection(layer, "k"), rows=kv_idx),
                   v=sliced_linear(spec.projection(layer, "v"), rows=kv_idx),
                   o=sliced_linear(spec.projection(layer, "o"), cols=q_idx, weight=o_weight))
    for name, linear in new.items():
        spec.set_projection(layer, name, linear)
    if not q_heads:  # the whole attention block goes (and the MLP, without channels): blocks.py
        spec.remove_block(layer, "attention")
        if not channels:
            spec.remove_block(layer, "mlp")
        return
    # Attention reshapes with (-1, head_dim); only the GQA repeat factor must be told.
    layer.get_submodule(spec.attention).num_key_value_groups = len(q_heads) // len(kv_heads)


@dataclass(frozen=True)
class Keep:
    """What one layer keeps: query heads (grouped by KV head, the same number per group), KV
    heads and MLP channels, as indices of the layer's current heads and channels."""

    q_heads: list[int]
    kv_heads: list[int]
    channels: list[int]


def leading(current: LayerDims, dims: LayerDims) -> Keep:
    """The first ``dims.n_kv`` KV groups, the first query heads of each and the first channels:
    how a checkpoint written at ``dims`` stores its kept heads and channels."""
    if dims.n_kv == 0:  # a removed attention block (and MLP, with n_ff 0)
        return Keep([], [], list(range(dims.n_ff)))
    per_now, per = current.n_head // current.n_kv, dims.n_head // dims.n_kv
    return Keep([g * per_now + j for g in range(dims.n_kv) for j in range(per)],
                list(range(dims.n_kv)), list(range(dims.n_ff)))


def resize_model(loaded, keeps: list) -> None:
    """Resize every layer of ``loaded`` in place to what it keeps (a Keep, or anything with
    q_heads, kv_heads and channels, such as a plan's LayerPlan); a layer whose sizes would not
    change is left as it is."""
    spec, head_dim = loaded.spec, loaded.shape.head_dim
    for layer, keep in zip(spec.layer_list(loaded.model), keeps, strict=True):
        dims = LayerDims(len(keep.q_heads), len(keep.kv_heads), len(keep.channels))
        if spec.layer_dims(layer, head_dim) != dims:
            resize_layer(layer, spec, head_dim, keep.q_heads, keep.kv_heads, keep.channels)
