"""The ONNX graph of a resized decoder, built node by node from the weights (no tracing).

One graph serves prefill and decode; every layer has its own head count, KV heads and MLP width,
and the architecture's own block (arch.ArchSpec): biases, q/k norms, Gemma's four norms, offset
norm scales, scaled embeddings and GELU, per-layer rotary bases and sliding windows. The
arithmetic is what transformers computes: rotary halves, grouped-query heads, the causal mask
(and window) combined with the attention mask, softmax and RMSNorm in float32.
"""

from __future__ import annotations

import numpy as np
import torch

from mosaic_export.arch import attention_scale, layer_windows, rope_base, unsupported_features
from mosaic_export.errors import UserError
from mosaic_export.model_io import LoadedModel

OPSET = 17
MASKED = -1e30  # added to the scores of positions a query may not see (finite: no NaN rows)


class _Graph:
    """A tiny ONNX graph builder: named nodes, initializers, cached integer constants."""

    def __init__(self):
        from onnx import numpy_helper

        self._from_array = numpy_helper.from_array
        self.nodes, self.initializers, self._consts, self._n = [], [], {}, 0

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self._from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        key = ("i64", values)
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_i64_{len(self._consts)}", np.array(values, np.int64))
        return self._consts[key]

    def scalar(self, value: float, dtype) -> str:
        key = (np.dtype(dtype).name, value)
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{key[0]}_{len(self._consts)}",
                                            np.array(value, dtype=dtype))
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, **attrs) -> str:
        from onnx import helper

        self._n += 1
        outputs = outputs or [f"{op_type.lower()}_{self._n}"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=f"{op_type}_{self._n}",
                                           **attrs))
        return outputs[0]


class _Decoder:
    """The decoder's graph, piece by piece, in one dtype (norms, softmax and logits in float32)."""

    def __init__(self, g: _Graph, loaded: LoadedModel, dtype: str):
        from onnx import TensorProto

        self.g, self.loaded, self.spec, self.fp16 = g, loaded, loaded.spec, dtype == "fp16"
        self.config = loaded.model.config
        self.np_float = np.float16 if self.fp16 else np.float32
        self.onnx_float = TensorProto.FLOAT16 if self.fp16 else TensorProto.FLOAT
        self.D, self.eps = loaded.shape.head_dim, float(self.config.rms_norm_eps)
        self.windows = layer_windows(self.config)
        self.scale = g.scalar(attention_scale(self.config, self.D), self.np_float)
        self._rotary, self._masks = {}, {}

    def param(self, name: str, t: torch.Tensor, transpose: bool = False) -> str:
        a = t.detach().float().numpy()
        return self.g.weight(name, (a.T if transpose else a).astype(self.np_float))

    def linear(self, x: str, lin, name: str) -> str:
        y = self.g.op("MatMul", x, self.param(f"{name}.weight_t", lin.weight, transpose=True))
        return self.g.op("Add", y, self.param(f"{name}.bias", lin.bias)) if lin.bias is not None else y

    def to_float32(self, x: str) -> str:
        from onnx import TensorProto

        return self.g.op("Cast", x, to=TensorProto.FLOAT) if self.fp16 else x

    def from_float32(self, x: str) -> str:
        return self.g.op("Cast", x, to=self.onnx_float) if self.fp16 else x

    def rms_norm(self, x: str, norm, name: str) -> str:
        """RMSNorm over the last axis, with the architecture's scale (Gemma: 1 + weight)."""
        g, xf = self.g, self.to_float32(x)
        var = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", var, g.scalar(self.eps, np.float32)))
        rstd = g.op("Div", g.scalar(1.0, np.float32), std)
        normed = self.from_float32(g.op("Mul", xf, rstd))
        return g.op("Mul", normed, self.param(f"{name}.weight", self.spec.norm_weight(norm)))

    def layer_norm(self, x: str, layer, role: str, name: str) -> str:
        """The layer's norm of that role, or x itself when the architecture has none there."""
        path = self.spec.norms.get(role)
        return x if path is None else self.rms_norm(x, layer.get_submodule(path), f"{name}.{role}")

    def rotary(self, base: float) -> tuple[str, str]:
        """cos and sin tables (B, 1, S, D) of the positions at a rotary base (one per base)."""
        from onnx import TensorProto

        if base not in self._rotary:
            g, D, n = self.g, self.D, len(self._rotary)
            inv_freq = 1.0 / (base ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
            pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.ints(2))
            freqs = g.op("Mul", pos, g.weight(f"rotary{n}.inv_freq", inv_freq.astype(np.float32)))
            angles = g.op("Concat", freqs, freqs, axis=-1)  # (B, S, D)
            self._rotary[base] = tuple(self.from_float32(g.op("Unsqueeze", g.op(op, angles), g.ints(1)))
                                       for op in ("Cos", "Sin"))
        return self._rotary[base]

    def attention_mask(self, window: int | None) -> str:
        """The causal mask (within the window, if any) combined with the attention mask:
        (B, 1, S, T) float32, 0 or MASKED; one per window."""
        from onnx import TensorProto

        if window in self._masks:
            return self._masks[window]
        g = self.g
        total = g.op("Gather", g.op("Shape", "attention_mask"), g.ints(1), axis=0)  # (1,) = P + S
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.ints(1), axis=0)
        zero, one = g.scalar(0, np.int64), g.scalar(1, np.int64)
        t_scalar = g.op("Squeeze", total, g.ints(0))
        k_pos = g.op("Unsqueeze", g.op("Range", zero, t_scalar, one), g.ints(0))  # (1, T)
        q_pos = g.op("Unsqueeze", g.op("Range", g.op("Squeeze", g.op("Sub", total, seq), g.ints(0)),
                                       t_scalar, one), g.ints(1))  # (S, 1)
        seen = g.op("LessOrEqual", k_pos, q_pos)
        if window is not None:  # transformers' sliding window: key > query - window
            seen = g.op("And", seen, g.op("Greater", k_pos, g.op("Sub", q_pos, g.scalar(window, np.int64))))
        padding = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2))
        self._masks[window] = g.op("Where", g.op("And", seen, padding), g.scalar(0.0, np.float32),
                                   g.scalar(MASKED, np.float32))
        return self._masks[window]

    def rotate(self, x: str, cos: str, sin: str) -> str:  # x cos + rotate_half(x) sin, [-x2, x1]
        g, D = self.g, self.D
        x1 = g.op("Slice", x, g.ints(0), g.ints(D // 2), g.ints(3))
        x2 = g.op("Slice", x, g.ints(D // 2), g.ints(D), g.ints(3))
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))

    def heads(self, x: str, n: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
        g = self.g
        return g.op("Transpose", g.op("Reshape", x, g.ints(0, 0, n, self.D)), perm=[0, 2, 1, 3])

    def qk(self, i: int, layer, h: str, part: str, n: int) -> str:
        """q or k of layer i: projected, split in heads, per-head normed (Qwen3, Gemma), rotated."""
        x = self.heads(self.linear(h, self.spec.projection(layer, part), f"layers.{i}.{part}"), n)
        x = self.layer_norm(x, layer, f"{part}_norm", f"layers.{i}")
        return self.rotate(x, *self.rotary(rope_base(self.config, self.windows[i])))

    def attention(self, i: int, layer, dims, h: str) -> str:
        """Layer i's attention output (before o), its KV cache in and out."""
        g, D = self.g, self.D
        nh, nkv = dims.n_head, dims.n_kv
        q, k = self.qk(i, layer, h, "q", nh), self.qk(i, layer, h, "k", nkv)
        v = self.heads(self.linear(h, self.spec.projection(layer, "v"), f"layers.{i}.v"), nkv)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, outputs=[f"present.{i}.value"])
        if nh != nkv:  # grouped-query: query head j reads KV head j // (nh / nkv)
            rep = g.ints(1, 1, nh // nkv, 1, 1)
            k = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", k, g.ints(2)), rep), g.ints(0, nh, -1, D))
            v = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", v, g.ints(2)), rep), g.ints(0, nh, -1, D))
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), self.scale)
        scores = g.op("Add", self.to_float32(scores), self.attention_mask(self.windows[i]))
        probs = self.from_float32(g.op("Softmax", scores, axis=-1))
        return g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3]),
                    g.ints(0, 0, nh * D))

    def activation(self, x: str) -> str:
        g = self.g
        if self.spec.activation == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        # gelu, tanh approximation: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = lambda v: g.scalar(v, self.np_float)  # noqa: E731
        inner = g.op("Mul", c(float(np.sqrt(2 / np.pi))),
                     g.op("Add", x, g.op("Mul", c(0.044715), g.op("Mul", x, g.op("Mul", x, x)))))
        return g.op("Mul", g.op("Mul", c(0.5), x), g.op("Add", c(1.0), g.op("Tanh", inner)))

    def layer(self, i: int, layer, dims, hidden: str) -> str:
        g, spec, name = self.g, self.spec, f"layers.{i}"
        attn = self.attention(i, layer, dims, self.layer_norm(hidden, layer, "attn_norm", name))
        attn = self.linear(attn, spec.projection(layer, "o"), f"{name}.o")
        hidden = g.op("Add", hidden, self.layer_norm(attn, layer, "attn_post_norm", name))
        h = self.layer_norm(hidden, layer, "ffn_norm", name)
        gate = self.linear(h, spec.projection(layer, "gate"), f"{name}.gate")
        up = self.linear(h, spec.projection(layer, "up"), f"{name}.up")
        down = self.linear(g.op("Mul", self.activation(gate), up), spec.projection(layer, "down"),
                           f"{name}.down")
        return g.op("Add", hidden, self.layer_norm(down, layer, "ffn_post_norm", name))

    def embed(self) -> str:
        """The token embeddings (Gemma: times sqrt(hidden), in the graph's dtype)."""
        g, model = self.g, self.loaded.model
        hidden = g.op("Gather", self.param("embed_tokens.weight", model.get_input_embeddings().weight),
                      "input_ids", axis=0)
        if self.spec.embed_scale:
            hidden = g.op("Mul", hidden, g.scalar(float(self.loaded.shape.hidden ** 0.5), self.np_float))
        return hidden

    def io(self) -> tuple[list, list]:
        """The graph's inputs and outputs, with each layer's own KV heads."""
        from onnx import TensorProto, helper

        D = self.D
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", "sequence", self.loaded.shape.vocab])]
        for i, dims in enumerate(self.loaded.layer_dims):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", self.onnx_float,
                                                            ["batch", dims.n_kv, "past", D]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", self.onnx_float,
                                                             ["batch", dims.n_kv, "total", D]))
        return inputs, outputs


def build_model(loaded: LoadedModel, dtype: str = "fp32"):
    """The onnx.ModelProto of the loaded (resized) model, fp32 or fp16."""
    from onnx import helper

    check_exportable(loaded)
    model, spec = loaded.model, loaded.spec
    g = _Graph()
    d = _Decoder(g, loaded, dtype)
    hidden = d.embed()
    for i, (layer, dims) in enumerate(zip(spec.layer_list(model), loaded.layer_dims, strict=True)):
        hidden = d.layer(i, layer, dims, hidden)
    h = d.rms_norm(hidden, model.get_submodule(spec.final_norm), "norm")
    lm_head = d.param("lm_head.weight_t", model.get_output_embeddings().weight, transpose=True)
    g.op("Identity", d.to_float32(g.op("MatMul", h, lm_head)), outputs=["logits"])
    inputs, outputs = d.io()
    graph = helper.make_graph(g.nodes, "mosaic_export_decoder", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mosaic-export")
    proto.ir_version = 8  # readable by onnxruntime >= 1.10
    return proto


def check_exportable(loaded: LoadedModel) -> None:
    """What the graph cannot express, refused before any work (UserError)."""
    unsupported = unsupported_features(loaded.model.config, loaded.spec)
    if unsupported:
        raise UserError(f"ONNX export of {', '.join(unsupported)} is not supported")
    if any(d.n_ff == 0 or d.n_head == 0 for d in loaded.layer_dims):
        raise UserError("ONNX export needs at least one head and one channel per layer")
