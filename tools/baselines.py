"""Published coarse-grained (structured) pruning methods, the baselines composite pruning is
measured against (tools/bench_quality.py). Neither retrains. Both are reimplemented from their
papers on this tool's calibration stream and resize code, hence "-style":

- FLAP-style (An et al., 2024, fluctuation-based adaptive structured pruning): a head or an MLP
  channel is worth the fluctuation of its inputs to the consumer (o / down): the sample variance
  of each input feature over the calibration tokens times the squared norm of its weight column,
  summed over a head's columns. The removed inputs' mean contribution is added back as a bias of
  o / down (its bias compensation). Two of FLAP's structures: uniform (UL-UM: the same ratio in
  every layer, layer by layer on the calibration stream, each layer's statistics on the pruned
  layers' outputs) and adaptive (AL-AM, FLAP's main method: the scores of the dense model's
  stream standardised per layer and module, one ranking of all heads and channels of the model
  by them, weighted by parameters; see ``adaptive_dims``).
- LLM-Pruner-style (Ma et al., 2023): first-order Taylor importance |w * dL/dw| of the language-
  modelling loss on the calibration samples, summed over each group's weights (a query head: its q
  rows and o columns, plus its share of its KV head's k and v rows; a channel: its gate and up rows
  and down column). The first 4/32 and the last 2/32 of the layers are kept (at least one each),
  as LLM-Pruner keeps them on LLaMA-7B (it prunes layers 4 to 29 of 32): 4 and 2 of SmolLM2's 30.
  Every other layer gets one ratio; no LoRA.

Both remove the same share of heads and of MLP parameters in each pruned layer: the query heads
of the nearest valid grouped-query layout, then channels so the total lands on the target.
"""

from __future__ import annotations

import torch
from torch import nn

from mosaic_export.method.calibration import LayerStream
from mosaic_export.method.prune.structured import choose_channels, choose_heads, head_options
from mosaic_export.model.arch import LayerDims, ModelShape
from mosaic_export.model.resize import expand_heads, resize_layer

LLM_PRUNER_KEPT = (4 / 32, 2 / 32)  # shares of the first and last layers left dense


def uniform_dims(shape: ModelShape, removal: float, pruned: list[int]) -> list[LayerDims]:
    """Per layer sizes removing ``removal`` of the decoder parameters from the ``pruned`` layers
    alone, the same in each: heads nearest to the layer ratio, channels for the rest."""
    dense = shape.dense_dims
    layer_params = shape.layer_params(dense)
    per_layer = removal * shape.n_layers * layer_params / len(pruned)
    keep = 1 - per_layer / layer_params
    g, q = min(head_options(shape.n_head, shape.n_kv),
               key=lambda o: (abs(o[0] * o[1] - keep * shape.n_head), -o[0] * o[1], -o[0]))
    attn = LayerDims(g * q, g, dense.n_ff)
    per_channel = layer_params - shape.layer_params(LayerDims(dense.n_head, dense.n_kv, dense.n_ff - 1))
    channels_out = round((per_layer - (layer_params - shape.layer_params(attn))) / per_channel)
    n_ff = min(dense.n_ff, max(1, dense.n_ff - channels_out))
    pruned_set = set(pruned)
    return [LayerDims(g * q, g, n_ff) if i in pruned_set else dense for i in range(shape.n_layers)]


def _add_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    linear.bias.data += bias.to(linear.weight.dtype)


def _removed_mean(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """What the removed input columns add to the output on average: W[:, removed] @ mean[removed]."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    return weight.double()[:, removed] @ mean[removed]


def _fluctuation(spec, shape: ModelShape, layer: nn.Module, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's fluctuation metric: (per input feature of o (n_head * head_dim,), per MLP channel):
    each input's variance over the calibration tokens times its weight column's squared norm."""
    o_w, down_w = spec.projection(layer, "o").weight, spec.projection(layer, "down").weight
    return ((o_w.double() ** 2).sum(0) * stats["o"].variance,
            (down_w.double() ** 2).sum(0) * stats["down"].variance)


def _flap_resize(layer: nn.Module, spec, shape: ModelShape, d: LayerDims, head: torch.Tensor,
                 channel: torch.Tensor, means: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keep d's best heads (by ``head``, per query head) and channels, and add the removed inputs'
    mean contribution (``means``: of o's and down's inputs) back as biases of o and down."""
    o_w, down_w = spec.projection(layer, "o").weight, spec.projection(layer, "down").weight
    heads = choose_heads(head, shape.n_kv, d.n_kv, d.n_head // d.n_kv)
    channels = choose_channels(channel, d.n_ff)
    o_bias = _removed_mean(o_w, means[0], expand_heads(heads.q_heads, shape.head_dim))
    down_bias = _removed_mean(down_w, means[1], torch.tensor(channels))
    resize_layer(layer, spec, shape.head_dim, heads.q_heads, heads.kv_heads, channels)
    _add_bias(spec.projection(layer, "o"), o_bias)
    _add_bias(spec.projection(layer, "down"), down_bias)


@torch.no_grad()
def flap_prune(model: nn.Module, spec, shape: ModelShape, calib: torch.Tensor, removal: float) -> None:
    """FLAP-style, uniform (UL-UM), in place (see the module's docstring)."""
    dims = uniform_dims(shape, removal, list(range(shape.n_layers)))
    stream = LayerStream(model, spec, calib, 1)
    for i, layer in stream.layers("FLAP-style"):
        stats = stream.statistics(layer, set())
        feature, channel = _fluctuation(spec, shape, layer, stats)
        head = feature.view(-1, shape.head_dim).sum(1)
        _flap_resize(layer, spec, shape, dims[i], head, channel, (stats["o"].mean, stats["down"].mean))
        stream.advance(layer)


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-30)


def adaptive_dims(shape: ModelShape, heads: torch.Tensor, channels: torch.Tensor, removal: float
                  ) -> list[LayerDims]:
    """FLAP's adaptive structure (AL-AM): per layer sizes from one ranking of every query head
    and MLP channel of the model by their standardised scores (``heads`` (n_layers, n_head),
    ``channels`` (n_layers, n_ff)), each weighted by its parameters, cut where ``removal`` of the
    decoder parameters goes. Each layer's head count then snaps to the nearest grouped-query
    layout (ties keep more, one head at least), and the channels are cut again, over the whole
    model, so that the total lands on the target (at least one channel a layer)."""
    dense = shape.dense_dims
    full = shape.layer_params(dense)
    r = dense.n_head // dense.n_kv  # a query head's parameters: its q rows, o columns, 1/r of its k, v
    per_head = (full - shape.layer_params(LayerDims(dense.n_head - r, dense.n_kv - 1, dense.n_ff))) / r
    per_channel = full - shape.layer_params(LayerDims(dense.n_head, dense.n_kv, dense.n_ff - 1))
    scores = torch.cat([heads.flatten(), channels.flatten()])
    weight = torch.cat([torch.full((heads.numel(),), per_head, dtype=torch.float64),
                        torch.full((channels.numel(),), float(per_channel), dtype=torch.float64)])
    order = torch.sort(scores, stable=True).indices  # the least worth first
    cut = int(torch.searchsorted(weight[order].cumsum(0), removal * shape.n_layers * full))
    gone = torch.zeros(scores.numel(), dtype=torch.bool)
    gone[order[:cut]] = True
    layouts = head_options(shape.n_head, shape.n_kv)
    dims = []
    for kept in (~gone[:heads.numel()]).view(heads.shape).sum(1).tolist():
        g, q = min(layouts, key=lambda o: (abs(o[0] * o[1] - kept), -o[0] * o[1], -o[0]))
        dims.append(LayerDims(g * q, g, dense.n_ff))
    rest = removal * shape.n_layers * full - sum(full - shape.layer_params(d) for d in dims)
    n_out = max(0, min(round(rest / per_channel), channels.numel() - shape.n_layers))
    floor = channels.max() + 1  # each layer's best channel is never cut
    ranked = channels.clone()
    ranked[torch.arange(shape.n_layers), channels.argmax(1)] = floor
    out = torch.zeros(channels.numel(), dtype=torch.bool)
    out[torch.sort(ranked.flatten(), stable=True).indices[:n_out]] = True
    n_ff = (~out).view(channels.shape).sum(1).tolist()
    return [LayerDims(d.n_head, d.n_kv, f) for d, f in zip(dims, n_ff, strict=True)]


@torch.no_grad()
def flap_adaptive_prune(model: nn.Module, spec, shape: ModelShape, calib: torch.Tensor,
                        removal: float) -> None:
    """FLAP-style, adaptive (AL-AM), in place: every layer's fluctuation and input means measured
    on the dense model's calibration stream, standardised within each layer and module (a head's
    score: the mean of its features' standardised scores), then ``adaptive_dims``; bias
    compensation from the dense stream's means, as FLAP's code does."""
    stream = LayerStream(model, spec, calib, 1)
    measured = []
    for _, layer in stream.layers("FLAP-style adaptive, measuring"):
        stats = stream.statistics(layer, set(), advance=True)
        feature, channel = _fluctuation(spec, shape, layer, stats)
        measured.append((_standardised(feature).view(-1, shape.head_dim).mean(1), _standardised(channel),
                         (stats["o"].mean, stats["down"].mean)))
    del stream
    dims = adaptive_dims(shape, torch.stack([m[0] for m in measured]), torch.stack([m[1] for m in measured]),
                         removal)
    for layer, d, (head, channel, means) in zip(spec.layer_list(model), dims, measured, strict=True):
        _flap_resize(layer, spec, shape, d, head, channel, means)


def taylor_importance(model: nn.Module, spec, shape: ModelShape, calib: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(query head scores (n_head,), channel scores (n_ff,)) per layer: |w * dL/dw| summed over
    each group's weights, the gradient of the mean loss over the calibration samples."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for sample in calib.split(1):
            loss = model(input_ids=sample, labels=sample, use_cache=False).loss / len(calib)
            loss.backward()
    r, hd = shape.n_head // shape.n_kv, shape.head_dim
    out = []
    for layer in spec.layer_list(model):
        imp = {p: (spec.projection(layer, p).weight * spec.projection(layer, p).weight.grad).abs().double()
               for p in ("q", "k", "v", "o", "gate", "up", "down")}
        kv = (imp["k"].sum(1) + imp["v"].sum(1)).view(shape.n_kv, hd).sum(1) / r
        head = (imp["q"].sum(1).view(-1, hd).sum(1) + imp["o"].sum(0).view(-1, hd).sum(1)
                + kv.repeat_interleave(r))
        out.append((head, imp["gate"].sum(1) + imp["up"].sum(1) + imp["down"].sum(0)))
    model.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def llm_pruner_prune(model: nn.Module, spec, shape: ModelShape, calib: torch.Tensor, removal: float) -> None:
    """LLM-Pruner-style, in place (see the module's docstring)."""
    first, last = (max(1, round(f * shape.n_layers)) for f in LLM_PRUNER_KEPT)
    dims = uniform_dims(shape, removal, list(range(first, shape.n_layers - last)))
    scores = taylor_importance(model, spec, shape, calib)
    for layer, d, (head, channel) in zip(spec.layer_list(model), dims, scores, strict=True):
        if d == shape.dense_dims:
            continue
        heads = choose_heads(head, shape.n_kv, d.n_kv, d.n_head // d.n_kv)
        resize_layer(layer, spec, shape.head_dim, heads.q_heads, heads.kv_heads,
                     choose_channels(channel, d.n_ff))


BASELINES = {"flap": flap_prune, "flap-adaptive": flap_adaptive_prune, "llm-pruner": llm_pruner_prune}
