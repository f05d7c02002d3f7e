"""Run a GGUF file in stock llama.cpp (llama-cpp-python): speed, memory, perplexity, parity.

llama.cpp always runs in a child process (``run_llama``), so its peak RSS and load time are its
own, not this process's (which holds the PyTorch model), and a crash of native code is reported
instead of killing mosaic-export:

    python -m mosaic_export.targets.gguf.runner MODEL.gguf --job bench [--eval-text FILE] [--json OUT]
    python -m mosaic_export.targets.gguf.runner MODEL.gguf --job parity --ids IDS.json \
        --reference LOGITS.npy [--text-file TEXT] [--json OUT]
    python -m mosaic_export.targets.gguf.runner MODEL.gguf --job generate --prompt P [--json OUT]
    python -m mosaic_export.targets.gguf.runner MODEL.gguf --job generate --prompts P.json
    python -m mosaic_export.targets.gguf.runner F32.gguf --job quantize --out Q.gguf --quant Q8_0

The quantizer runs in a child too: it maps the whole float file into memory, which would count
in this process's resident set.

The safe setting (``--safe``) loads the model with llama.cpp's extra buffer types off
(``llama_model_params.use_extra_bufts = False``): no AMX matmul and no weight repacking. ggml's AMX
path dies with SIGSEGV (a general protection fault at ``ldtilecfg``) inside some virtual machines
whose CPU reports AMX; elsewhere the extra buffer types are kept, since repacking speeds up some
types. A child killed by a signal is run once more with the safe setting, and the rest of this
process's runs use it; the result records which setting ran (``llama_setup``).

Speed: load time; prefill of a ``prompt_tokens`` prompt (tokens/s); greedy decode of
``gen_tokens`` tokens, one at a time (tokens/s); peak RSS of the process up to there (the
runner imports no torch). Perplexity: the evaluation of
mosaic_export.method.evaluate (non-overlapping windows from the start, each scored alone), on tokens from
the GGUF's own tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import corpus
from mosaic_export.measure.process import (
    RuntimeCrash,
    decode_rates,
    die_with_parent,
    emit,
    option_args,
    peak_rss_bytes,
    run_child,
)
from mosaic_export.targets.base import CHUNK, Evaluation
from mosaic_export.targets.scoring import window_perplexity

MODULE = "mosaic_export.targets.gguf.runner"
SAFE_ENV = "MOSAIC_LLAMA_SAFE"  # 1: always load with the safe setting; 0: never fall back to it
# Fault injection for tests: the child kills itself with SIGSEGV before its first evaluation when
# it runs without the safe setting, as llama.cpp's AMX path does on the affected machines.
FAULT_ENV = "MOSAIC_FAULT_LLAMA_UNSAFE_SEGV"
JOBS = {"bench": "benchmarking", "parity": "checking parity of", "generate": "generating with",
        "quantize": "quantizing to"}


@contextlib.contextmanager
def _model_params(safe: bool):
    """While a Llama is constructed, its default model parameters have ``use_extra_bufts`` off when
    ``safe`` (llama-cpp-python has no argument for it)."""
    import llama_cpp.llama_cpp as lib

    if not safe:
        yield
        return
    default = lib.llama_model_default_params

    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_bufts
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def _llama(path: Path, n_ctx: int, threads: int | None, logits_all: bool, n_batch: int | None = None,
           safe: bool = False):
    import llama_cpp

    n_batch = n_batch or n_ctx
    with _model_params(safe):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                              n_threads=threads or os.cpu_count(), logits_all=logits_all,
                              verbose=False, seed=0)
    if not safe and os.environ.get(FAULT_ENV) == "1":
        os.kill(os.getpid(), signal.SIGSEGV)
    return llm


# This process's choice: None until a child crashed (or SAFE_ENV decided), then the fallback's note.
_fallback: dict = {"safe": os.environ.get(SAFE_ENV) == "1", "reason": None}


def run_llama(job: str, path: Path, name: str | None = None, **options) -> dict:
    """Run a job of this module on ``path`` in a child process and return its result. A child
    killed by a signal is reported by name and run once more with the safe setting, which the
    rest of this process's runs keep; ``result["llama_setup"]`` says which setting ran."""
    name = name or Path(path).name

    def attempt(safe: bool) -> dict:
        args = [str(path), "--job", job, *option_args({**options, "safe": safe})]
        return run_child(MODULE, args, "llama.cpp", JOBS[job], name)

    safe = _fallback["safe"]
    try:
        result = attempt(safe)
    except RuntimeCrash as e:
        if safe or os.environ.get(SAFE_ENV) == "0":
            raise
        print(f"mosaic-export: warning: {e}; running it again with llama.cpp's extra buffer types "
              "off (no AMX, no weight repacking)", file=sys.stderr)
        _fallback.update(safe=True, reason=str(e))
        try:
            result = attempt(True)
        except RuntimeCrash as again:
            raise RuntimeCrash(f"{again} (also with llama.cpp's extra buffer types off)",
                               again.signal_name) from None
        safe = True
    result["llama_setup"] = {"extra_buffer_types": not safe, "fallback_after": _fallback["reason"]}
    return result


def _last_logits(llm) -> np.ndarray:
    """The logits of the last token evaluated. (Without logits_all, llama-cpp-python does not
    copy logits into ``llm.scores``; the context still holds the last row.)"""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llama_perplexity(llm, tokens: list[int], seq_len: int, max_windows: int | None) -> dict:
    def logits_of(window: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(window)
        return np.asarray(llm.scores[: seq_len - 1])

    return window_perplexity(logits_of, tokens, seq_len, max_windows)


def measure(path: Path, evaluation: Evaluation, safe: bool = False) -> dict:
    """Everything about one GGUF file, measured in this process. With ``evaluation.context``, the KV cache
    is sized for that many tokens and filled after the decode (in chunks of CHUNK tokens), so
    peak RSS is that of an app whose context is full."""

    n_ctx = max(evaluation.context or 0, evaluation.prompt_tokens + evaluation.gen_tokens)
    t0 = time.perf_counter()
    llm = _llama(path, n_ctx, evaluation.threads, logits_all=False,
                 n_batch=max(CHUNK, evaluation.prompt_tokens), safe=safe)
    load_s = time.perf_counter() - t0
    text = llm.tokenize(corpus("builtin").encode(), add_bos=False, special=False)
    prompt = text[:evaluation.prompt_tokens]
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    steps = []
    for _ in range(evaluation.gen_tokens):
        t0 = time.perf_counter()
        llm.eval([int(np.argmax(_last_logits(llm)))])
        steps.append(time.perf_counter() - t0)
    fill = text[len(prompt):len(prompt) + n_ctx - llm.n_tokens] if evaluation.fill else []
    for start in range(0, len(fill), CHUNK):
        llm.eval(fill[start:start + CHUNK])
    result = {
        "file": str(path), "file_bytes": path.stat().st_size, "threads": evaluation.threads or os.cpu_count(),
        "load_s": load_s,
        "prefill": {"tokens": len(prompt), "seconds": prefill_s, "tokens_per_s": len(prompt) / prefill_s},
        "decode": decode_rates(steps),
        "context": llm.n_tokens, "filled": evaluation.fill,
        # High-water mark of this process (llama.cpp, numpy, no torch) after prefill, decode and
        # filling the context, before the perplexity pass, whose all-position logits would
        # dominate it.
        "peak_rss_bytes": peak_rss_bytes(),
    }
    del llm
    if evaluation.eval_text is not None and evaluation.eval_windows != 0:
        llm = _llama(path, evaluation.eval_seq_len, evaluation.threads, logits_all=True, safe=safe)
        tokens = llm.tokenize(corpus(evaluation.eval_text).encode(), add_bos=False, special=False)
        ppl = llama_perplexity(llm, tokens, evaluation.eval_seq_len, evaluation.eval_windows)
        result["perplexity"] = {**ppl, "text": evaluation.eval_text}
        del llm
    return result


def benchmark(path: Path, name: str | None = None, **kwargs) -> dict:
    """measure() in a fresh process (its own peak RSS); returns its result."""
    if not Path(path).is_file():
        raise UserError(f"GGUF file not found: {path}")
    return run_llama("bench", Path(path), name, **kwargs)


def agreement(ids: list[int], cpp: np.ndarray, ref: np.ndarray) -> dict:
    """Greedy next-token agreement at every position and the largest logit difference."""
    return {"positions": len(ids), "top1_agreement": float((cpp.argmax(-1) == ref.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(cpp - ref).max())}


def tokenize_file(path: Path, text: str) -> list[int]:
    """A GGUF file's own tokenization of text (vocabulary only: no weights are loaded)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def parity_in_process(path: Path, ids: list[int], reference: np.ndarray, threads: int | None = None,
                      text: str | None = None, source_gguf: Path | None = None,
                      safe: bool = False) -> dict:
    """llama.cpp's logits on ids against the reference's; with ``text``, also llama.cpp's token
    ids of that text (``text_ids``), and with ``source_gguf`` the source file's (``source_text_ids``)."""
    llm = _llama(path, len(ids), threads, logits_all=True, safe=safe)
    llm.eval([int(t) for t in ids])
    result = agreement(ids, np.asarray(llm.scores[: len(ids)]), reference)
    if text is not None:
        result["text_ids"] = llm.tokenize(text.encode(), add_bos=False, special=False)
        if source_gguf is not None:
            result["source_text_ids"] = tokenize_file(source_gguf, text)
    return result


def next_token_agreement(model, path: Path, ids, threads: int | None = None, text: str | None = None,
                         name: str | None = None, source_gguf: Path | None = None) -> dict:
    """PyTorch vs llama.cpp (in a child process) on the same token ids (1-D): greedy next-token
    agreement at every position and the largest logit difference; with ``text``, llama.cpp's ids
    for it (``text_ids``), and the source GGUF's (``source_text_ids``) when given."""
    import torch

    ids = [int(t) for t in ids]
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float().numpy()
    with tempfile.TemporaryDirectory(prefix="mosaic-parity-") as tmp:
        np.save(Path(tmp) / "reference.npy", ref)
        (Path(tmp) / "ids.json").write_text(json.dumps(ids))
        text_file = None
        if text is not None:
            text_file = Path(tmp) / "text.txt"
            text_file.write_text(text, encoding="utf-8")
        return run_llama("parity", Path(path), name, ids=Path(tmp) / "ids.json",
                         reference=Path(tmp) / "reference.npy", text_file=text_file,
                         source_gguf=source_gguf, threads=threads)


def generate_in_process(path: Path, prompts: list[str], max_tokens: int, chat: bool,
                        threads: int | None, context: int, safe: bool = False) -> list[str]:
    """Greedy generation for each prompt, one model load (the chat template when the model has
    one and ``chat``)."""
    llm = _llama(path, context, threads, logits_all=False, safe=safe)
    use_chat = chat and llm.metadata.get("tokenizer.chat_template")
    texts = []
    try:
        for prompt in prompts:
            if use_chat:
                out = llm.create_chat_completion([{"role": "user", "content": prompt}],
                                                 max_tokens=max_tokens, temperature=0.0)
                texts.append(out["choices"][0]["message"]["content"])
            else:
                texts.append(llm.create_completion(prompt, max_tokens=max_tokens,
                                                   temperature=0.0)["choices"][0]["text"])
    except ValueError as e:  # a prompt longer than the context
        raise UserError(str(e)) from None
    return texts


@contextlib.contextmanager
def native_log(path: Path):
    """Send what native code (llama.cpp) writes to stderr into a file: its per-tensor log is
    kept out of the terminal, and shown only when the call fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize_in_process(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (through llama-cpp-python): F32 GGUF -> quant type, in this process."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads
    log = dst.with_suffix(".log")
    with native_log(log):
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise UserError(f"llama.cpp could not quantize {src} to {quant} (code {code}): "
                        + " | ".join(tail))


def quantize(src: Path, dst: Path, quant: str, name: str | None = None) -> dict:
    """quantize_in_process in a child process, like every call into llama.cpp: it maps the float
    file into memory and reads all of it, which would count in this process's resident set (a
    model's whole float32 size), and a crash is reported by name ("llama.cpp crashed (SIGSEGV)
    while quantizing to NAME"), not the end of this process. The child's peak RSS is returned."""
    return run_child(MODULE, [str(src), "--job", "quantize", "--out", str(dst), "--quant", quant],
                     "llama.cpp", JOBS["quantize"], name or Path(dst).name)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    p.add_argument("model", type=Path)
    p.add_argument("--job", choices=tuple(JOBS), default="bench")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--safe", action="store_true", help="llama.cpp's extra buffer types off")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--no-fill", action="store_true",
                   help="bench: time prefill and decode only; the cache is sized for --context, not filled")
    p.add_argument("--ids", type=Path, default=None, help="parity: a JSON list of token ids")
    p.add_argument("--reference", type=Path, default=None, help="parity: reference logits (.npy)")
    p.add_argument("--text-file", type=Path, default=None, help="parity: text to tokenize")
    p.add_argument("--source-gguf", type=Path, default=None,
                   help="parity: also tokenize the text with this GGUF's vocabulary")
    p.add_argument("--prompt", default=None, help="generate: the prompt")
    p.add_argument("--prompts", type=Path, default=None,
                   help="generate: a JSON list of prompts, answered in turn (one model load)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="quantize: the file to write")
    p.add_argument("--quant", default=None, help="quantize: the GGUF type")
    a = p.parse_args(argv)
    try:
        if a.job == "quantize":
            quantize_in_process(a.model, a.out, a.quant)
            result = {"peak_rss_bytes": peak_rss_bytes()}
        elif a.job == "bench":
            result = measure(a.model, Evaluation.from_args(a), a.safe)
        elif a.job == "parity":
            text = a.text_file.read_text(encoding="utf-8") if a.text_file else None
            result = parity_in_process(a.model, json.loads(a.ids.read_text()), np.load(a.reference),
                                       a.threads, text, a.source_gguf, a.safe)
        else:
            prompts = json.loads(a.prompts.read_text()) if a.prompts else [a.prompt]
            texts = generate_in_process(a.model, prompts, a.max_tokens, not a.no_chat, a.threads,
                                        a.context or 2048, a.safe)
            result = {"texts": texts} if a.prompts else {"text": texts[0]}
    except ValueError as e:  # llama-cpp-python: "Failed to load model from file"
        print(f"mosaic-export: error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"mosaic-export: error: {e}", file=sys.stderr)
        return 2
    emit(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
