"""ONNX target: a resized decoder, each layer at its own head count and MLP width, with KV cache.

Optimum's exporter and onnxruntime-genai's builder read one head count and one MLP width from the
config and assume every layer has them, so a pruned model gets its own writer. The graph is built
node by node from the weights (no tracing): one graph serves prefill and decode.

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, kv_i, P, head_dim), kv_i = layer i's KV heads
    outputs  logits (B, S, vocab) float32, present.{i}.key / .value (B, kv_i, P+S, head_dim)

B, S and P are dynamic; P = 0 is the first call. The graph (onnx_graph.py) computes what
transformers computes for the architecture; the folder also holds the tokenizer files and
``model_config.json`` (per-layer sizes, input / output names, eos ids, chat template) for an app.

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
from .onnx_graph import OPSET, build_model, check_exportable
from .onnx_target import CONFIG_FILE, CONFIG_FORMAT, INT8_BLOCK, MODEL_FILE, ONNX


def check_dtype(dtype: str) -> str:
    return ONNX().check_type(dtype)


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
