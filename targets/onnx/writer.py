"""ONNX target: a resized decoder, each layer at its own head count and MLP width, with KV cache,
in ONNX Runtime's fused operators (onnx_graph.py) and loadable by ONNX Runtime GenAI.

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64 (right padding),
             past_key_values.{i}.key / .value (B, kv_i, P, head_dim), kv_i = layer i's KV heads
    outputs  logits (B, S, vocab) float32, present.{i}.key / .value (B, kv_i, P+S, head_dim)

B, S and P are dynamic; P = 0 is the first call. Positions come from the attention mask (inside
GroupQueryAttention). The folder also holds the tokenizer files, ``model_config.json`` (per-layer
sizes, input / output names, eos ids, chat template) for an app, and ``genai_config.json`` for
ONNX Runtime GenAI when every layer keeps the same KV heads (GenAI sizes one KV cache for all).

Precisions: fp32; fp16 (weights, activations and KV cache in float16, logits in float32); int8 and
int4 (weight-only MatMulNBits, symmetric, one scale per block of 32 inputs, int8 compute on CPU;
the output layer and the embedding table at int8: onnx_quant.py). Every dtype's weights are
written to the data file as the graph is built (onnx_data.py), a streamed model's a layer at a
time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.method.evaluate import forward_model
from mosaic_export.model.folder import LoadedModel
from mosaic_export.targets.base import Evaluation
from mosaic_export.targets.onnx.data import ExternalData
from mosaic_export.targets.onnx.graph import OPSET, build_model, check_exportable
from mosaic_export.targets.onnx.runner import available_provider, logits_and_greedy
from mosaic_export.targets.onnx.table import (
    CONFIG_FILE,
    CONFIG_FORMAT,
    GENAI_CONFIG_FILE,
    MAX_FP32_LOGIT_DIFF,
    MIN_AGREEMENT,
    MODEL_FILE,
    check_type,
)


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


def model_config(loaded: LoadedModel, dtype: str, eos: list[int]) -> dict:
    tok = loaded.tokenizer
    return {
        "format": CONFIG_FORMAT, "version": 2, "dtype": dtype, "opset": OPSET, "file": MODEL_FILE,
        "model_type": loaded.shape.model_type, "vocab": loaded.shape.vocab, "hidden": loaded.shape.hidden,
        "head_dim": loaded.shape.head_dim,
        "layers": [dict(n_head=d.n_head, n_kv=d.n_kv, n_ff=d.n_ff) for d in loaded.layer_dims],
        "past_dtype": "float16" if dtype == "fp16" else "float32",
        "inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key", "past_key_values.{i}.value"],
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
        "bos_token_id": tok.bos_token_id, "eos_token_ids": eos,
        "chat_template": getattr(tok, "chat_template", None),
    }


def _write(loaded: LoadedModel, dtype: str, path: Path) -> None:
    """model.onnx (the graph) + model.onnx.data (the weights), each weight written to the data
    file as the graph is built (onnx_data.py: a streamed model is written a layer at a time).
    External data also lifts protobuf's 2 GiB limit, and ONNX Runtime then reads the weights
    without holding a second copy inside the parsed graph while it loads: peak RSS measured 10-23%
    lower for SmolLM2 (BENCHMARKS.md)."""
    import onnx

    data = ExternalData(path.with_name(path.name + ".data"))
    try:
        proto = build_model(loaded, dtype, data=data)
    finally:
        data.close()
    onnx.save_model(proto, str(path))  # the graph alone: its weights point into the data file


def genai_config(loaded: LoadedModel, eos: list[int]) -> dict | None:
    """ONNX Runtime GenAI's genai_config.json, or None when the layers' KV heads differ (GenAI
    sizes one KV cache shape for every layer; a plan keeps them with --kv-heads keep)."""
    kv = {d.n_kv for d in loaded.layer_dims}
    if len(kv) != 1:
        return None
    config, tok = loaded.model.config, loaded.tokenizer
    context = int(config.max_position_embeddings)
    kind = config.model_type if config.model_type in GENAI_TYPES else "decoder"
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE, "head_size": loaded.shape.head_dim, "hidden_size": loaded.shape.hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": max(d.n_head for d in loaded.layer_dims),  # each layer's own is in the graph
        "num_hidden_layers": len(loaded.layer_dims), "num_key_value_heads": kv.pop(),
    }
    model = {"context_length": context, "decoder": decoder, "type": kind, "vocab_size": loaded.shape.vocab,
             "pad_token_id": next((t for t in (tok.pad_token_id, *eos) if t is not None), 0)}
    if tok.bos_token_id is not None:
        model["bos_token_id"] = tok.bos_token_id
    if eos:
        model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    search = {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")  # model types GenAI names as such


def export(loaded: LoadedModel, folder: Path, dtype: str = "fp32") -> Path:
    """Write folder/ (model.onnx, model.onnx.data, tokenizer files, model_config.json and, where
    the KV heads allow, genai_config.json); returns the model path. Everything is written in a
    temporary folder beside it first."""
    check_type(dtype)
    check_exportable(loaded)
    folder = Path(folder)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write(loaded, dtype, work / MODEL_FILE)
        loaded.tokenizer.save_pretrained(work)
        eos = eos_token_ids(loaded)  # reads a GGUF source whole: once
        (work / CONFIG_FILE).write_text(json.dumps(model_config(loaded, dtype, eos), indent=1) + "\n")
        genai = genai_config(loaded, eos)
        if genai is not None:
            (work / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return folder / MODEL_FILE




def parity(loaded: LoadedModel, folder: Path, ids: torch.Tensor, gen_tokens: int = 64,
           prompt_tokens: int = 32, threads: int | None = None) -> dict:
    """ONNX Runtime (in a child process: its copy of the weights is not this process's) against
    PyTorch: logits on ids (1-D) at every position, and greedy generation of gen_tokens after the
    first prompt_tokens with the KV cache against transformers' generate. A streamed model (its
    layers on disk) is not generated with: a pass a token would read every layer each time."""

    prompt = ids[:prompt_tokens]
    ort_logits, ours, genai = logits_and_greedy(folder, ids.tolist(), prompt_tokens, gen_tokens, threads)
    with torch.no_grad():
        ref = forward_model(loaded)(input_ids=ids[None]).logits[0].float().numpy()
    agreement = float((ort_logits.argmax(-1) == ref.argmax(-1)).mean())
    diff = np.abs(np.subtract(ort_logits, ref, out=ort_logits), out=ort_logits)  # no more copies
    result = {"positions": len(ids), "max_abs_logit_diff": float(diff.max()), "top1_agreement": agreement,
              "greedy_tokens": gen_tokens, "greedy_identical": None, "greedy_first_difference": None,
              "genai": genai}
    if loaded.weights is not None:
        result["greedy_not_compared"] = "a streamed model is not generated with in PyTorch"
        return result
    with torch.no_grad():
        theirs = loaded.model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None],
                                       max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                       do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    result.update(greedy_identical=all(same),
                  greedy_first_difference=None if all(same) else same.index(False))
    return result


def deploy(loaded: LoadedModel, folder: Path, dtype: str, parity_ids: torch.Tensor,
           evaluation: Evaluation, provider: str | None = None) -> dict:
    """Export, compare with PyTorch in ONNX Runtime (and ONNX Runtime GenAI, where the folder is
    for it)."""

    export(loaded, folder, dtype)
    check = parity(loaded, folder, parity_ids, threads=evaluation.threads)
    if dtype == "fp32" and not check["max_abs_logit_diff"] <= MAX_FP32_LOGIT_DIFF:
        raise UserError(f"the fp32 ONNX model disagrees with PyTorch: max |logit difference| "
                        f"{check['max_abs_logit_diff']:.2e} > {MAX_FP32_LOGIT_DIFF:g}")
    if not check["top1_agreement"] >= MIN_AGREEMENT[dtype]:
        raise UserError(f"the {dtype} ONNX model disagrees with PyTorch: greedy next token agrees at "
                        f"{check['top1_agreement']:.1%} of {check['positions']} positions "
                        f"(floor for {dtype}: {MIN_AGREEMENT[dtype]:.0%})")
    genai_agrees(check["genai"], folder.name, check["greedy_tokens"])
    check["min_agreement"] = MIN_AGREEMENT[dtype]
    return {"folder": folder.name, "dtype": dtype, "opset": OPSET, "provider": available_provider(provider),
            "genai": (folder / GENAI_CONFIG_FILE).is_file(), "provider_wanted": provider, "parity": check}


def genai_agrees(genai: dict, name: str, wanted: int) -> None:
    """A UserError when ONNX Runtime GenAI checked the folder and its greedy tokens are not ours:
    a different token, or a stop short of ``wanted`` tokens without an end-of-sequence token."""
    if not genai.get("checked") or genai["identical"]:
        return
    if genai["first_difference"] is not None:
        raise UserError(f"ONNX Runtime GenAI disagrees with ONNX Runtime on {name}: its greedy tokens "
                        f"differ from ours at token {genai['first_difference']} ({genai['tokens']} compared)")
    raise UserError(f"ONNX Runtime GenAI disagrees with ONNX Runtime on {name}: it stopped after "
                    f"{genai['tokens']} of {wanted} greedy tokens, without an end-of-sequence token")
