"""ONNX target: a resized decoder, each layer at its own head count and MLP width, with KV cache.

Optimum's exporter and onnxruntime-genai's builder read one head count and one MLP width from the
config and assume every layer has them, so a pruned model gets its own writer. The graph is built
node by node from the weights (no tracing): one graph serves prefill and decode.

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, kv_i, P, head_dim), kv_i = layer i's KV heads
    outputs  logits (B, S, vocab) float32, present.{i}.key / .value (B, kv_i, P+S, head_dim)

B, S and P are dynamic; P = 0 is the first call. The attention is what transformers' Llama computes
(rotary halves, grouped-query heads, causal mask combined with the attention mask, softmax in
float32, RMSNorm in float32); the folder also holds the tokenizer files and ``model_config.json``
(per-layer sizes, input / output names, eos ids, chat template) for an app.

Precisions: fp32; fp16 (weights, activations and KV cache in float16; norms, softmax and logits in
float32); int8 (weight-only, onnxruntime's MatMulNBits quantizer on the fp32 graph; see quantize_int8).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mosaic_export.errors import UserError
from mosaic_export.model_io import LoadedModel

from .base import Evaluation
from .onnx_target import CONFIG_FILE, CONFIG_FORMAT, INT8_BLOCK, MODEL_FILE, ONNX

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
OPSET = 17
MASKED = -1e30  # added to the scores of positions a query may not see (finite: no NaN rows)


def check_dtype(dtype: str) -> str:
    return ONNX().check_type(dtype)


def check_exportable(loaded: LoadedModel) -> None:
    shape, cfg = loaded.shape, loaded.model.config
    if shape.model_type not in SUPPORTED_ARCHS:
        raise UserError(f"ONNX export supports {', '.join(SUPPORTED_ARCHS)}; this model is "
                        f"'{shape.model_type}'")
    if getattr(cfg, "rope_scaling", None):
        raise UserError(f"ONNX export of rope scaling {cfg.rope_scaling} is not supported")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None:
        raise UserError(f"ONNX export of sliding-window attention ({window}) is not supported")
    if any(d.n_ff == 0 or d.n_head == 0 for d in loaded.layer_dims):
        raise UserError("ONNX export needs at least one head and one channel per layer")


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """Every id that ends generation: the generation config's, the tokenizer's and, for a model
    read from GGUF, the GGUF's own (transformers' tokenizer rebuilt from GGUF can miss it)."""
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    if loaded.gguf_file is not None:
        import gguf

        field = gguf.GGUFReader(loaded.gguf_file).fields.get("tokenizer.ggml.eos_token_id")
        if field is not None:
            ids.add(int(field.contents()))
    return sorted(ids)


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

        self.g, self.loaded, self.fp16 = g, loaded, dtype == "fp16"
        self.np_float = np.float16 if self.fp16 else np.float32
        self.onnx_float = TensorProto.FLOAT16 if self.fp16 else TensorProto.FLOAT
        self.D, self.eps = loaded.shape.head_dim, float(loaded.model.config.rms_norm_eps)

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
        g, xf = self.g, self.to_float32(x)
        var = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", var, g.scalar(self.eps, np.float32)))
        rstd = g.op("Div", g.scalar(1.0, np.float32), std)
        normed = self.from_float32(g.op("Mul", xf, rstd))
        return g.op("Mul", normed, self.param(f"{name}.weight", norm.weight))

    def rotary(self) -> None:
        """cos and sin tables (B, 1, S, D) of the positions."""
        from onnx import TensorProto

        g, D = self.g, self.D
        theta = float(self.loaded.model.config.rope_theta)
        inv_freq = 1.0 / (theta ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
        pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.ints(2))
        freqs = g.op("Mul", pos, g.weight("rotary.inv_freq", inv_freq.astype(np.float32)))  # (B, S, D/2)
        angles = g.op("Concat", freqs, freqs, axis=-1)
        self.cos = self.from_float32(g.op("Unsqueeze", g.op("Cos", angles), g.ints(1)))  # (B, 1, S, D)
        self.sin = self.from_float32(g.op("Unsqueeze", g.op("Sin", angles), g.ints(1)))

    def attention_mask(self) -> None:
        """The causal mask combined with the attention mask: (B, 1, S, T) float32, 0 or MASKED."""
        from onnx import TensorProto

        g = self.g
        total = g.op("Gather", g.op("Shape", "attention_mask"), g.ints(1), axis=0)  # (1,) = P + S
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.ints(1), axis=0)
        zero, one = g.scalar(0, np.int64), g.scalar(1, np.int64)
        t_scalar = g.op("Squeeze", total, g.ints(0))
        k_pos = g.op("Range", zero, t_scalar, one)  # (T,)
        q_pos = g.op("Range", g.op("Squeeze", g.op("Sub", total, seq), g.ints(0)), t_scalar, one)  # (S,)
        causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.ints(0)), g.op("Unsqueeze", q_pos, g.ints(1)))
        padding = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2))
        self.mask = g.op("Where", g.op("And", causal, padding), g.scalar(0.0, np.float32),
                         g.scalar(MASKED, np.float32))

    def rotate(self, x: str) -> str:  # x * cos + rotate_half(x) * sin, rotate_half = [-x2, x1]
        g, D = self.g, self.D
        x1 = g.op("Slice", x, g.ints(0), g.ints(D // 2), g.ints(3))
        x2 = g.op("Slice", x, g.ints(D // 2), g.ints(D), g.ints(3))
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, self.cos), g.op("Mul", rot, self.sin))

    def heads(self, x: str, n: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
        g = self.g
        return g.op("Transpose", g.op("Reshape", x, g.ints(0, 0, n, self.D)), perm=[0, 2, 1, 3])

    def attention(self, i: int, layer, dims, h: str, scale: str) -> str:
        """Layer i's attention output (before o), its KV cache in and out."""
        g, D, spec, name = self.g, self.D, self.loaded.spec, f"layers.{i}"
        nh, nkv = dims.n_head, dims.n_kv
        q = self.rotate(self.heads(self.linear(h, spec.projection(layer, "q"), f"{name}.q"), nh))
        k = self.rotate(self.heads(self.linear(h, spec.projection(layer, "k"), f"{name}.k"), nkv))
        v = self.heads(self.linear(h, spec.projection(layer, "v"), f"{name}.v"), nkv)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, outputs=[f"present.{i}.value"])
        if nh != nkv:  # grouped-query: query head j reads KV head j // (nh / nkv)
            rep = g.ints(1, 1, nh // nkv, 1, 1)
            k = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", k, g.ints(2)), rep), g.ints(0, nh, -1, D))
            v = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", v, g.ints(2)), rep), g.ints(0, nh, -1, D))
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        probs = self.from_float32(g.op("Softmax", g.op("Add", self.to_float32(scores), self.mask), axis=-1))
        return g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3]),
                    g.ints(0, 0, nh * D))

    def layer(self, i: int, layer, dims, hidden: str, scale: str) -> str:
        g, spec, name = self.g, self.loaded.spec, f"layers.{i}"
        h = self.rms_norm(hidden, layer.get_submodule(spec.norms["attn_norm"]), f"{name}.attn_norm")
        attn = self.attention(i, layer, dims, h, scale)
        hidden = g.op("Add", hidden, self.linear(attn, spec.projection(layer, "o"), f"{name}.o"))
        h = self.rms_norm(hidden, layer.get_submodule(spec.norms["ffn_norm"]), f"{name}.ffn_norm")
        gate = self.linear(h, spec.projection(layer, "gate"), f"{name}.gate")
        up = self.linear(h, spec.projection(layer, "up"), f"{name}.up")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return g.op("Add", hidden, self.linear(act, spec.projection(layer, "down"), f"{name}.down"))

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
    embed = d.param("embed_tokens.weight", model.get_input_embeddings().weight)
    hidden = g.op("Gather", embed, "input_ids", axis=0)
    d.rotary()
    d.attention_mask()
    scale = g.scalar(d.D ** -0.5, d.np_float)
    for i, (layer, dims) in enumerate(zip(spec.layer_list(model), loaded.layer_dims, strict=True)):
        hidden = d.layer(i, layer, dims, hidden, scale)
    h = d.rms_norm(hidden, model.get_submodule(spec.final_norm), "norm")
    lm_head = d.param("lm_head.weight_t", model.get_output_embeddings().weight, transpose=True)
    g.op("Identity", d.to_float32(g.op("MatMul", h, lm_head)), outputs=["logits"])
    inputs, outputs = d.io()
    graph = helper.make_graph(g.nodes, "mosaic_export_decoder", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mosaic-export")
    proto.ir_version = 8  # readable by onnxruntime >= 1.10
    return proto


def model_config(loaded: LoadedModel, dtype: str) -> dict:
    tok = loaded.tokenizer
    return {
        "format": CONFIG_FORMAT, "version": 1, "dtype": dtype, "opset": OPSET, "file": MODEL_FILE,
        "model_type": loaded.shape.model_type, "vocab": loaded.shape.vocab, "hidden": loaded.shape.hidden,
        "head_dim": loaded.shape.head_dim,
        "layers": [dict(n_head=d.n_head, n_kv=d.n_kv, n_ff=d.n_ff) for d in loaded.layer_dims],
        "past_dtype": "float16" if dtype == "fp16" else "float32",
        "inputs": ["input_ids", "attention_mask", "position_ids",
                   "past_key_values.{i}.key", "past_key_values.{i}.value"],
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
        "bos_token_id": tok.bos_token_id, "eos_token_ids": eos_token_ids(loaded),
        "chat_template": getattr(tok, "chat_template", None),
    }


def _save(proto, path: Path) -> None:
    """model.onnx (the graph) + model.onnx.data (the weights). External data also lifts protobuf's
    2 GiB limit, and ONNX Runtime then reads the weights without holding a second copy inside the
    parsed graph while it loads: peak RSS measured 10-23% lower for SmolLM2 (BENCHMARKS.md)."""
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)




def quantize_int8(proto):
    """Weight-only int8 with onnxruntime's MatMulNBits quantizer: symmetric, one scale per block of
    INT8_BLOCK inputs of every MatMul weight; accuracy level 4 computes with int8 activations
    quantized per block (onnxruntime's fast CPU path). Chosen over quantize_dynamic, whose one
    activation scale per tensor lost too much on SmolLM2 (see BENCHMARKS.md)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(proto, bits=8, block_size=INT8_BLOCK, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
    finally:
        logging.getLogger().setLevel(level)
    return quantizer.model.model


def export(loaded: LoadedModel, folder: Path, dtype: str = "fp32") -> Path:
    """Write folder/ (model.onnx, model.onnx.data, tokenizer files, model_config.json); returns the
    model path. Everything is written in a temporary folder beside it first."""
    check_dtype(dtype)
    check_exportable(loaded)
    folder = Path(folder)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        if dtype == "int8":
            _save(quantize_int8(build_model(loaded, "fp32")), work / MODEL_FILE)
        else:
            _save(build_model(loaded, dtype), work / MODEL_FILE)
        loaded.tokenizer.save_pretrained(work)
        (work / CONFIG_FILE).write_text(json.dumps(model_config(loaded, dtype), indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return folder / MODEL_FILE


MAX_FP32_LOGIT_DIFF = 1e-3  # fp32 must match PyTorch this closely on every logit
# Parity floors: the least greedy next-token agreement with PyTorch (on the parity window of real
# text) each dtype must reach, at build and in `verify`: about 4 points under the lowest of
# SmolLM2-135M dense and 30% pruned (tools/parity_floors.py, BENCHMARKS.md "Parity floors").
MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.97, "int8": 0.90}


def parity(loaded: LoadedModel, folder: Path, ids: torch.Tensor, gen_tokens: int = 64,
           prompt_tokens: int = 32, threads: int | None = None) -> dict:
    """ONNX Runtime against PyTorch: logits on ids (1-D) at every position, and greedy generation
    of gen_tokens after the first prompt_tokens with the KV cache against transformers' generate."""
    from .onnx_runner import OnnxDecoder

    decoder = OnnxDecoder(folder, threads=threads)
    ort_logits, _ = decoder.forward(ids[None].numpy(), decoder.empty_past())
    prompt = ids[:prompt_tokens]
    ours = decoder.generate(prompt.tolist(), gen_tokens)
    del decoder
    with torch.no_grad():
        ref = loaded.model(input_ids=ids[None]).logits[0].float().numpy()
        theirs = loaded.model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None],
                                       max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                       do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    return {"positions": len(ids), "max_abs_logit_diff": float(np.abs(ort_logits[0] - ref).max()),
            "top1_agreement": float((ort_logits[0].argmax(-1) == ref.argmax(-1)).mean()),
            "greedy_tokens": gen_tokens, "greedy_identical": all(same),
            "greedy_first_difference": None if all(same) else same.index(False)}


def deploy(loaded: LoadedModel, folder: Path, dtype: str, parity_ids: torch.Tensor,
           evaluation: Evaluation, provider: str | None = None) -> dict:
    """Export, compare with PyTorch in ONNX Runtime, benchmark in a fresh process."""
    from .onnx_runner import available_provider, benchmark

    export(loaded, folder, dtype)
    check = parity(loaded, folder, parity_ids, threads=evaluation.threads)
    if dtype == "fp32" and not check["max_abs_logit_diff"] <= MAX_FP32_LOGIT_DIFF:
        raise UserError(f"the fp32 ONNX model disagrees with PyTorch: max |logit difference| "
                        f"{check['max_abs_logit_diff']:.2e} > {MAX_FP32_LOGIT_DIFF:g}")
    if not check["top1_agreement"] >= MIN_AGREEMENT[dtype]:
        raise UserError(f"the {dtype} ONNX model disagrees with PyTorch: greedy next token agrees at "
                        f"{check['top1_agreement']:.1%} of {check['positions']} positions "
                        f"(floor for {dtype}: {MIN_AGREEMENT[dtype]:.0%})")
    check["min_agreement"] = MIN_AGREEMENT[dtype]
    used = available_provider(provider)
    bench = benchmark(folder, provider=used, **evaluation.benchmark_options())
    return {"folder": folder.name, "dtype": dtype, "opset": OPSET, "provider": used,
            "provider_wanted": provider, "parity": check, "benchmark": bench}
