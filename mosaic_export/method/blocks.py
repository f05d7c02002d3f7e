"""Whole blocks as a structure: a layer's whole attention, or the whole layer, removed.

A removed attention block has no weights and no KV cache; a removed layer (attention and MLP)
costs nothing at all. llama.cpp stores such layers in its per-layer architecture (deci) as
n_head = 0 (attention-free, as Nemotron-51B) and n_ff = 0; its deci skips an n_ff = 0 layer
whole, attention included, so a layer never loses its MLP and keeps its attention (LayerDims:
(0, 0, n_ff) or (0, 0, 0)). Layer 0 keeps its attention: transformers reads the cache length
from layer 0 when it generates. The last layer keeps its MLP: llama.cpp picks the output rows
inside the last layer, and a last layer skipped whole aborts it (GGML_ASSERT(buffer), seen with
llama-cpp-python 0.3.36; tests/unit/test_blocks.py).

Pass 1 measures what each block writes into the residual stream, relative to the stream
(``block_energy``): attention ||a||^2 / ||h + a||^2, MLP ||m||^2 / ||out||^2, the whole layer
||out - h||^2 / ||out||^2, summed over the calibration tokens. ``choose_blocks`` removes, one at
a time, the block that costs least of that per parameter removed, while it fits in the target.
"""

from __future__ import annotations

import contextlib

import torch

from mosaic_export.model.arch import LayerDims, ModelShape
from mosaic_export.model.names import ATTENTION, MLP


class _Energy:
    def __init__(self):
        self.sums = dict.fromkeys(("attention", "attention_after", "mlp", "layer", "out"), 0.0)
        self.h = None

    def scores(self) -> dict[str, float]:
        s = self.sums
        return {"attention": s["attention"] / max(s["attention_after"], 1e-30),
                "mlp": s["mlp"] / max(s["out"], 1e-30), "layer": s["layer"] / max(s["out"], 1e-30)}


def _sq(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


@contextlib.contextmanager
def block_energy(layer, spec):
    """While the layer runs (on the calibration stream), what each block writes; .scores()."""
    e = _Energy()

    def layer_in(_m, args, kwargs):
        e.h = args[0] if args else kwargs["hidden_states"]

    def attention_out(_m, _args, out):
        a = out[0] if isinstance(out, tuple) else out
        e.sums["attention"] += _sq(a)
        e.sums["attention_after"] += _sq(e.h + a)

    def mlp_out(_m, _args, out):
        e.sums["mlp"] += _sq(out)

    def layer_out(_m, _args, out):
        o = out[0] if isinstance(out, tuple) else out
        e.sums["layer"] += _sq(o - e.h)
        e.sums["out"] += _sq(o)

    handles = [layer.register_forward_pre_hook(layer_in, with_kwargs=True),
               layer.get_submodule(spec.attention).register_forward_hook(attention_out),
               layer.get_submodule(spec.mlp).register_forward_hook(mlp_out),
               layer.register_forward_hook(layer_out)]
    try:
        yield e
    finally:
        for h in handles:
            h.remove()


def _params(shape: ModelShape, group: tuple[str, ...]) -> int:
    """A block's parameters: its projections and the norm before it."""
    return sum(shape.projection_params(p, shape.dense_dims) for p in group) + shape.hidden


def choose_blocks(shape: ModelShape, scores: list[dict[str, float]],
                  removed_target: float) -> list[LayerDims]:
    """Per layer sizes after removing whole blocks, cheapest (score per parameter) first, while
    the next fits in ``removed_target`` parameters; the rest of the target is left to the caller."""
    dense = shape.dense_dims
    attn, mlp, whole = _params(shape, ATTENTION), _params(shape, MLP), shape.layer_params(dense)
    state = ["dense"] * shape.n_layers
    left = removed_target
    while True:
        moves = []
        last = shape.n_layers - 1
        for i in range(1, shape.n_layers):
            s = scores[i]
            if state[i] == "dense":
                moves.append((s["attention"] / attn, i, 0, "attention", attn))
                if i != last:
                    moves.append((s["layer"] / whole, i, 1, "layer", whole))
            elif state[i] == "attention" and i != last:
                moves.append((s["mlp"] / mlp, i, 0, "layer", mlp))
        fits = [m for m in moves if m[4] <= left]
        if not fits:
            break
        _, i, _, new_state, size = min(fits)
        state[i], left = new_state, left - size
    return [dense if st == "dense" else LayerDims(0, 0, 0 if st == "layer" else dense.n_ff) for st in state]
