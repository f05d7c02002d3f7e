"""The ONNX graph of a resized decoder, built node by node from the weights (no tracing), with
ONNX Runtime's fused operators: the graph ONNX Runtime GenAI's model builder writes for a uniform
model, here with every layer at its own query heads, KV heads and MLP width.

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (com.microsoft): RMSNorm, and
        the residual add fused with the next norm; the residual stream is carried as (sum, delta)
    GroupQueryAttention (com.microsoft): q / k / v (packed in one MatMul where the layer has no
        q / k norms), rotary inside (cos / sin tables of the layer's base), the causal mask, the
        layer's window, grouped heads, the KV cache in and out
    MatMul, and MatMulNBits and GatherBlockQuantized at int8 / int4 (weight-only: onnx_quant.py)

The arithmetic is what transformers computes for the architecture (arch.ArchSpec): biases, q / k
norms, Gemma's four norms, offset norm scales, scaled embeddings and GELU, per-layer rotary bases
and sliding windows; norms and softmax accumulate in float32 inside the operators. Padding is on
the right (GroupQueryAttention reads each row's length from the attention mask), as GenAI feeds it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.model.arch import attention_scale, layer_windows, rope_base, unsupported_features
from mosaic_export.model.folder import LoadedModel
from mosaic_export.model.weights import Rows, table_rows
from mosaic_export.targets.onnx import quant as onnx_quant
from mosaic_export.targets.onnx.data import ExternalData
from mosaic_export.targets.onnx.table import BITS

OPSET = 17
MS = "com.microsoft"  # ONNX Runtime's contrib operators
MIN_POSITIONS = 4096


class _Graph:
    """A tiny ONNX graph builder: named nodes, initializers, cached integer constants. With
    ``data``, each initializer's bytes are written to the external data file as it is made."""

    def __init__(self, data: ExternalData | None = None):
        from onnx import numpy_helper

        self._from_array, self.data = numpy_helper.from_array, data
        self.nodes, self.initializers, self._consts, self._n = [], [], {}, 0

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.initializers.append(self._from_array(array, name) if self.data is None
                                 else self.data.array(name, array))
        return name

    def table(self, name: str, rows: Rows, dtype, transpose: bool = False) -> str:
        """An embedding or output table, in dtype (``transpose``: stored as columns x rows): a
        chunk of rows at a time to the data file, or whole in the graph where there is none."""
        if self.data is not None:
            self.initializers.append(self.data.rows(name, rows, dtype, transpose))
            return name
        whole = torch.cat(list(rows.chunks())).numpy()
        return self.weight(name, (whole.T if transpose else whole).astype(dtype))

    def tables(self, names: list[str], n: int, parts) -> list[str]:
        """Tensors of n rows each, made together a chunk of rows at a time (``parts``: per chunk,
        one array per name): to the data file as made, or joined whole where there is none."""
        if self.data is not None:
            self.initializers.extend(self.data.rows_of(names, n, parts))
            return names
        for name, whole in zip(names, (np.concatenate(p) for p in zip(*parts, strict=True)), strict=True):
            self.weight(name, whole)
        return names

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

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, domain: str = "",
           **attrs) -> str:
        from onnx import helper

        self._n += 1
        outputs = outputs or [f"{op_type.lower()}_{self._n}"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=f"{op_type}_{self._n}",
                                           domain=domain, **attrs))
        return outputs[0]


class _Decoder:
    """The decoder's graph, piece by piece, in one dtype (logits in float32; int8 / int4: weights
    only, activations in float32)."""

    def __init__(self, g: _Graph, loaded: LoadedModel, dtype: str):
        from onnx import TensorProto

        self.g, self.loaded, self.spec, self.fp16 = g, loaded, loaded.spec, dtype == "fp16"
        self.bits = BITS.get(dtype)
        self._output: tuple[str, str] | None = None  # int types: the output layer's codes, scales
        self.config = loaded.model.config
        self.np_float = np.float16 if self.fp16 else np.float32
        self.onnx_float = TensorProto.FLOAT16 if self.fp16 else TensorProto.FLOAT
        self.D, self.eps = loaded.shape.head_dim, float(self.config.rms_norm_eps)
        self.windows = layer_windows(self.config)
        # rotary tables for the model's positions, and at least MIN_POSITIONS: transformers computes
        # angles past max_position_embeddings too, and a benchmark's prompt may go there
        self.positions = max(int(self.config.max_position_embeddings), MIN_POSITIONS)
        self._rotary: dict[float, tuple[str, str]] = {}
        self._lengths: tuple[str, str] | None = None

    def param(self, name: str, t: torch.Tensor, transpose: bool = False) -> str:
        a = t.detach().float().numpy()
        return self.g.weight(name, np.ascontiguousarray(a.T if transpose else a, dtype=self.np_float))

    def linear(self, x: str, lins: list, name: str) -> str:
        """x times one or more projections packed side by side in one MatMul (+ their biases)."""
        w = torch.cat([lin.weight for lin in lins], 0)
        if self.bits:
            packed, scales = onnx_quant.nbits(w.detach().float().numpy().T, self.bits)
            codes = self.g.weight(f"{name}.weight_t_Q{self.bits}", packed)
            y = onnx_quant.matmul_nbits(self.g, x, codes, self.g.weight(f"{name}.weight_t_scales", scales),
                                        w.shape[1], w.shape[0], self.bits)
        else:
            y = self.g.op("MatMul", x, self.param(f"{name}.weight_t", w, transpose=True))
        if all(lin.bias is None for lin in lins):
            return y
        bias = torch.cat([lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
                          for lin in lins])
        return self.g.op("Add", y, self.param(f"{name}.bias", bias))

    def norm_weight(self, layer, role: str, name: str) -> str | None:
        path = self.spec.norms.get(role)
        if path is None:
            return None
        return self.param(f"{name}.{role}.weight", self.spec.norm_weight(layer.get_submodule(path)))

    def norm(self, x: str, weight: str | None) -> str:
        """RMSNorm over the last axis (x itself where the architecture has no norm there)."""
        if weight is None:
            return x
        return self.g.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=self.eps, stash_type=1)

    def skip_norm(self, delta: str, residual: str, weight: str) -> tuple[str, str]:
        """RMSNorm(residual + delta) and residual + delta, in one operator."""
        n = len(self.g.nodes)
        normed, total = f"skip_norm_{n}", f"residual_{n}"
        self.g.op("SkipSimplifiedLayerNormalization", delta, residual, weight, domain=MS, epsilon=self.eps,
                  outputs=[normed, "", "", total])
        return normed, total

    def rotary(self, base: float) -> tuple[str, str]:
        """cos and sin tables (positions, head_dim / 2) at a rotary base (one pair per base)."""
        if base not in self._rotary:
            D, n = self.D, len(self._rotary)
            inv_freq = 1.0 / (base ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
            angles = np.outer(np.arange(self.positions, dtype=np.float32), inv_freq)
            self._rotary[base] = (self.g.weight(f"rotary{n}.cos", np.cos(angles).astype(self.np_float)),
                                  self.g.weight(f"rotary{n}.sin", np.sin(angles).astype(self.np_float)))
        return self._rotary[base]

    def lengths(self) -> tuple[str, str]:
        """From the attention mask: each row's length - 1 (int32) and the total length (int32)."""
        from onnx import TensorProto

        if self._lengths is None:
            g = self.g
            seen = g.op("ReduceSum", "attention_mask", g.ints(1), keepdims=0)
            seqlens = g.op("Cast", g.op("Sub", seen, g.scalar(1, np.int64)), to=TensorProto.INT32)
            total = g.op("Gather", g.op("Shape", "attention_mask"), g.scalar(1, np.int64), axis=0)
            self._lengths = (seqlens, g.op("Cast", total, to=TensorProto.INT32))
        return self._lengths

    def head_norm(self, x: str, layer, part: str, n: int, name: str) -> str:
        """Qwen3's and Gemma's per-head q / k RMSNorm."""
        weight = self.norm_weight(layer, f"{part}_norm", name)
        if weight is None:
            return x
        g = self.g
        normed = self.norm(g.op("Reshape", x, g.ints(0, 0, n, self.D)), weight)
        return g.op("Reshape", normed, g.ints(0, 0, n * self.D))

    def attention(self, i: int, layer, dims, h: str) -> str:
        """Layer i's attention output (before o), its KV cache in and out."""
        name, spec = f"layers.{i}", self.spec
        q, k, v = (spec.projection(layer, p) for p in ("q", "k", "v"))
        if all(p not in spec.norms for p in ("q_norm", "k_norm")):
            qkv = [self.linear(h, [q, k, v], f"{name}.qkv"), "", ""]
        else:
            qkv = [self.head_norm(self.linear(h, [q], f"{name}.q"), layer, "q", dims.n_head, name),
                   self.head_norm(self.linear(h, [k], f"{name}.k"), layer, "k", dims.n_kv, name),
                   self.linear(h, [v], f"{name}.v")]
        window = self.windows[i]
        cos, sin = self.rotary(rope_base(self.config, window))
        return self.g.op(
            "GroupQueryAttention", *qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
            *self.lengths(), cos, sin, domain=MS,
            outputs=[f"attention_{i}", f"present.{i}.key", f"present.{i}.value"],
            num_heads=dims.n_head, kv_num_heads=dims.n_kv, scale=attention_scale(self.config, self.D),
            do_rotary=1, rotary_interleaved=0, local_window_size=-1 if window is None else window)

    def activation(self, x: str) -> str:
        g = self.g
        if self.spec.activation == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        # gelu, tanh approximation: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = lambda v: g.scalar(v, self.np_float)  # noqa: E731
        inner = g.op("Mul", c(float(np.sqrt(2 / np.pi))),
                     g.op("Add", x, g.op("Mul", c(0.044715), g.op("Mul", x, g.op("Mul", x, x)))))
        return g.op("Mul", g.op("Mul", c(0.5), x), g.op("Add", c(1.0), g.op("Tanh", inner)))

    def layer(self, i: int, layer, dims, residual: str, delta: str | None) -> tuple[str, str]:
        """Layer i on the residual stream residual + delta (delta None: the embeddings alone);
        returns the stream after it, again as (residual, delta)."""
        spec, name = self.spec, f"layers.{i}"
        if dims.n_ff == 0:  # the whole layer removed (blocks.py): the stream passes through
            return residual, delta
        if dims.n_head:  # else the attention block is removed: no nodes, no KV cache
            h, residual = self.normed(residual, delta, self.norm_weight(layer, "attn_norm", name))
            attn = self.linear(self.attention(i, layer, dims, h), [spec.projection(layer, "o")], f"{name}.o")
            delta = self.norm(attn, self.norm_weight(layer, "attn_post_norm", name))
        h, residual = self.normed(residual, delta, self.norm_weight(layer, "ffn_norm", name))
        gate = self.linear(h, [spec.projection(layer, "gate")], f"{name}.gate")
        up = self.linear(h, [spec.projection(layer, "up")], f"{name}.up")
        down = self.linear(self.g.op("Mul", self.activation(gate), up), [spec.projection(layer, "down")],
                           f"{name}.down")
        return residual, self.norm(down, self.norm_weight(layer, "ffn_post_norm", name))

    def normed(self, residual: str, delta: str | None, weight: str | None) -> tuple[str, str]:
        """The norm of residual + delta, and that sum (delta None: the residual alone)."""
        if delta is None:
            return self.norm(residual, weight), residual
        return self.skip_norm(delta, residual, weight)

    def embed(self) -> str:
        """The token embeddings (Gemma: times sqrt(hidden), in the graph's dtype)."""
        g, model, shape = self.g, self.loaded.model, self.loaded.shape
        rows = table_rows(model, self.loaded.weights, "input")
        if self.bits:  # tied: the output layer's int8 matrix, made here and multiplied by in head
            if shape.tied_embeddings:
                self._output = onnx_quant.output_table(g, "lm_head.weight_t", rows)
            hidden = onnx_quant.embedding(g, "input_ids", shape.hidden, self._output, rows)
        else:
            hidden = g.op("Gather", g.table("embed_tokens.weight", rows, self.np_float), "input_ids", axis=0)
        if self.spec.embed_scale:
            hidden = g.op("Mul", hidden, g.scalar(float(self.loaded.shape.hidden ** 0.5), self.np_float))
        return hidden

    def head(self, residual: str, delta: str) -> None:
        """The final norm and the output layer: logits in float32. A tied output layer multiplies
        by the embedding table transposed in the graph (one copy of the table in the file; GenAI's
        builder transposes it the other way, for the lookup), an untied one by its own transposed
        copy; at int8 / int4, by the output layer's int8 matrix (see embed)."""
        from onnx import TensorProto

        model, g = self.loaded.model, self.g
        h, _ = self.skip_norm(delta, residual, self.param("norm.weight", self.spec.norm_weight(
            model.get_submodule(self.spec.final_norm))))
        if self.bits:
            if self._output is None:
                self._output = onnx_quant.output_table(g, "lm_head.weight_t",
                                                       table_rows(model, self.loaded.weights, "output"))
            shape, bits = self.loaded.shape, onnx_quant.OUTER_BITS
            logits = onnx_quant.matmul_nbits(g, h, *self._output, shape.hidden, shape.vocab, bits)
        elif self.loaded.shape.tied_embeddings:  # ONNX Runtime folds the Transpose at load
            logits = g.op("MatMul", h, g.op("Transpose", "embed_tokens.weight", perm=[1, 0]))
        else:
            output = table_rows(model, self.loaded.weights, "output")
            logits = g.op("MatMul", h, g.table("lm_head.weight_t", output, self.np_float, transpose=True))
        if self.fp16:
            logits = g.op("Cast", logits, to=TensorProto.FLOAT)
        g.op("Identity", logits, outputs=["logits"])

    def io(self) -> tuple[list, list]:
        """The graph's inputs and outputs, with each layer's own KV heads."""
        from onnx import TensorProto, helper

        D = self.D
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", "sequence", self.loaded.shape.vocab])]
        for i, dims in enumerate(self.loaded.layer_dims):
            for kind in ("key", "value") if dims.n_kv else ():  # a removed attention has no cache
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", self.onnx_float,
                                                            ["batch", dims.n_kv, "past", D]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", self.onnx_float,
                                                             ["batch", dims.n_kv, "total", D]))
        return inputs, outputs


def build_model(loaded: LoadedModel, dtype: str = "fp32", data: ExternalData | None = None):
    """The onnx.ModelProto of the loaded (resized) model in dtype (fp32, fp16, int8, int4).
    With ``data`` its weights are written there as they are made (the proto points into it); a
    streamed model (its layers read one at a time) needs it."""
    from onnx import helper

    check_exportable(loaded)
    model, spec, streamed = loaded.model, loaded.spec, loaded.weights is not None
    if streamed and data is None:
        raise ValueError("a streamed model's graph is built with its weights written out (data)")
    g = _Graph(data)
    d = _Decoder(g, loaded, dtype)
    residual, delta = d.embed(), None
    for i, (layer, dims) in enumerate(zip(spec.layer_list(model), loaded.layer_dims, strict=True)):
        with loaded.weights.held([(i, layer)]) if streamed else contextlib.nullcontext():
            residual, delta = d.layer(i, layer, dims, residual, delta)
    d.head(residual, delta)
    inputs, outputs = d.io()
    graph = helper.make_graph(g.nodes, "mosaic_export_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="mosaic-export")
    proto.ir_version = 8  # readable by onnxruntime >= 1.10
    return proto


def check_exportable(loaded: LoadedModel) -> None:
    """What the graph cannot express, refused before any work (UserError)."""
    unsupported = unsupported_features(loaded.model.config, loaded.spec)
    if unsupported:
        raise UserError(f"ONNX export of {', '.join(unsupported)} is not supported")
    if any(d.n_ff == 0 and d.n_head for d in loaded.layer_dims):
        raise UserError("ONNX export of a layer without its MLP but with attention is not supported")
