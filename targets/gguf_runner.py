"""Run a GGUF file in stock llama.cpp (llama-cpp-python): speed, memory, perplexity, parity.

``benchmark`` runs ``measure`` in a separate process, so peak RSS and load time are the
runtime's own, not this process's (which holds the PyTorch model):

    python -m mosaic_export.targets.gguf_runner MODEL.gguf [--eval-text FILE] [--json OUT]

Speed: load time; prefill of a ``prompt_tokens`` prompt (tokens/s); greedy decode of
``gen_tokens`` tokens, one at a time (tokens/s); peak RSS of the process up to there (the
runner imports no torch). Perplexity: the protocol of
mosaic_export.evaluate (non-overlapping windows from the start, each scored alone), on tokens from
the GGUF's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..process import decode_rates, measure_in_subprocess, peak_rss_bytes


def _llama(path: Path, n_ctx: int, threads: int | None, logits_all: bool, n_batch: int | None = None):
    import llama_cpp

    n_batch = n_batch or n_ctx
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                           n_threads=threads or os.cpu_count(), logits_all=logits_all,
                           verbose=False, seed=0)


def _last_logits(llm) -> np.ndarray:
    """The logits of the last token evaluated. (Without logits_all, llama-cpp-python does not
    copy logits into ``llm.scores``; the context still holds the last row.)"""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def llama_perplexity(llm, tokens: list[int], seq_len: int, max_windows: int | None) -> dict:
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"evaluation text has fewer than {seq_len} tokens")
    total = 0.0
    for w in range(n):
        window = tokens[w * seq_len:(w + 1) * seq_len]
        llm.reset()
        llm.eval(window)
        logp = _log_softmax(np.asarray(llm.scores[: seq_len - 1]))
        total -= float(logp[np.arange(seq_len - 1), window[1:]].sum())
    count = n * (seq_len - 1)
    return {"perplexity": math.exp(total / count), "nll": total / count, "n_windows": n,
            "seq_len": seq_len, "n_predicted": count}


def measure(path: Path, prompt_tokens: int = 512, gen_tokens: int = 128, threads: int | None = None,
            eval_text: str | None = None, eval_windows: int | None = 16, eval_seq_len: int = 512,
            context: int | None = None) -> dict:
    """Everything about one GGUF file, measured in this process. With ``context``, the KV cache
    is sized for that many tokens and filled after the decode (in chunks of CHUNK tokens), so
    peak RSS is that of an app whose context is full."""
    from ..costmodel import CHUNK
    from ..texts import corpus

    n_ctx = max(context or 0, prompt_tokens + gen_tokens)
    t0 = time.perf_counter()
    llm = _llama(path, n_ctx, threads, logits_all=False, n_batch=max(CHUNK, prompt_tokens))
    load_s = time.perf_counter() - t0
    text = llm.tokenize(corpus("builtin").encode(), add_bos=False, special=False)
    prompt = text[:prompt_tokens]
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    steps = []
    for _ in range(gen_tokens):
        t0 = time.perf_counter()
        llm.eval([int(np.argmax(_last_logits(llm)))])
        steps.append(time.perf_counter() - t0)
    fill = text[len(prompt):len(prompt) + n_ctx - llm.n_tokens]
    for start in range(0, len(fill), CHUNK):
        llm.eval(fill[start:start + CHUNK])
    result = {
        "file": str(path), "file_bytes": path.stat().st_size, "threads": threads or os.cpu_count(),
        "load_s": load_s,
        "prefill": {"tokens": len(prompt), "seconds": prefill_s, "tokens_per_s": len(prompt) / prefill_s},
        "decode": decode_rates(steps),
        "context": llm.n_tokens,
        # High-water mark of this process (llama.cpp, numpy, no torch) after prefill, decode and
        # filling the context, before the perplexity pass, whose all-position logits would
        # dominate it.
        "peak_rss_bytes": peak_rss_bytes(),
    }
    del llm
    if eval_text is not None and eval_windows != 0:
        llm = _llama(path, eval_seq_len, threads, logits_all=True)
        tokens = llm.tokenize(corpus(eval_text).encode(), add_bos=False, special=False)
        result["perplexity"] = {**llama_perplexity(llm, tokens, eval_seq_len, eval_windows),
                                "text": eval_text}
        del llm
    return result


def benchmark(path: Path, **kwargs) -> dict:
    """measure() in a fresh process (its own peak RSS); returns its result."""
    if not Path(path).is_file():
        raise UserError(f"GGUF file not found: {path}")
    return measure_in_subprocess("mosaic_export.targets.gguf_runner", path,
                                 "llama.cpp", **kwargs)


def next_token_agreement(model, path: Path, ids, threads: int | None = None) -> dict:
    """PyTorch vs llama.cpp on the same token ids (1-D): greedy next-token agreement at every
    position, and the largest logit difference."""
    import torch

    llm = _llama(path, len(ids), threads, logits_all=True)
    llm.eval([int(t) for t in ids])
    cpp = np.asarray(llm.scores[: len(ids)])
    del llm
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float().numpy()
    return {"positions": len(ids), "top1_agreement": float((cpp.argmax(-1) == ref.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(cpp - ref).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mosaic_export.targets.gguf_runner")
    p.add_argument("model", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=None)
    a = p.parse_args(argv)
    result = measure(a.model, a.prompt_tokens, a.gen_tokens, a.threads, a.eval_text,
                     None if a.eval_windows == -1 else a.eval_windows, a.eval_seq_len, a.context)
    text = json.dumps(result, indent=1)
    if a.json:
        a.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
