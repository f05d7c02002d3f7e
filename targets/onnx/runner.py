"""Run an exported ONNX folder in ONNX Runtime: greedy generation with the KV cache, speed, memory,
perplexity. Imports no torch and no transformers (the tokenizer is read with `tokenizers`), so the
numbers are the runtime's own; ``benchmark`` runs ``measure`` in a fresh process, and
``logits_and_greedy`` the parity check's runtime side (job ``parity``):

    python -m mosaic_export.targets.onnx.runner FOLDER [--eval-text FILE] [--json OUT]
    python -m mosaic_export.targets.onnx.runner FOLDER --job parity --ids IDS.json --logits OUT.npy

Speed: load time (session creation); prefill of a ``prompt_tokens`` prompt (tokens/s); greedy decode
of ``gen_tokens`` tokens, one at a time with the KV cache (tokens/s); peak RSS (VmHWM) up to there.
Perplexity: the evaluation of mosaic_export.method.evaluate (non-overlapping windows from the start, each
scored alone, tokens 2..seq_len predicted).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mosaic_export.core.errors import UserError
from mosaic_export.measure.process import (
    decode_rates,
    die_with_parent,
    measure_in_subprocess,
    option_args,
    peak_rss_bytes,
    report,
    run_child,
)
from mosaic_export.targets.base import CHUNK, Evaluation
from mosaic_export.targets.onnx.genai import check
from mosaic_export.targets.onnx.table import CONFIG_FILE, CONFIG_FORMAT, PROVIDERS
from mosaic_export.targets.scoring import text_ids, window_perplexity

DEFAULT_PROVIDER = "CPUExecutionProvider"
MODULE = "mosaic_export.targets.onnx.runner"


def available_provider(wanted: str | None) -> str:
    """The wanted provider when this onnxruntime has it, else the CPU one."""
    import onnxruntime as ort

    return wanted if wanted in ort.get_available_providers() else DEFAULT_PROVIDER


class OnnxDecoder:
    """One ONNX Runtime session over a folder written by targets.onnx.export."""

    def __init__(self, folder: Path, provider: str = DEFAULT_PROVIDER, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        try:
            self.config = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{folder}: not an ONNX folder written by mosaic-export ({e})") from None
        if self.config.get("format") != CONFIG_FORMAT:
            raise UserError(f"{folder}/{CONFIG_FILE}: not a mosaic-export ONNX config")
        if provider not in PROVIDERS:
            raise UserError(f"execution provider '{provider}' unknown; known: {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if provider not in available:
            raise UserError(f"ONNX Runtime here has no {provider} (available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(folder / self.config["file"]), options,
                                                providers=[provider])
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"ONNX Runtime cannot load {folder}: {str(e).splitlines()[0]}") from None
        self.folder = folder
        self.past_dtype = np.float16 if self.config["past_dtype"] == "float16" else np.float32
        self.n_layers = len(self.config["layers"])

    @functools.cached_property
    def takes_positions(self) -> bool:
        return "position_ids" in {i.name for i in self.session.get_inputs()}

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.folder / "tokenizer.json"))

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        d = self.config["head_dim"]
        return [np.zeros((batch, self.config["layers"][i]["n_kv"], 0, d), self.past_dtype)
                for i in self.cached_layers for _ in ("key", "value")]

    @functools.cached_property
    def cached_layers(self) -> list[int]:
        """The layers with a KV cache (a removed attention block has none)."""
        return [i for i, layer in enumerate(self.config["layers"]) if layer["n_kv"]]

    def forward(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, S) after past (B, kv, P, D) per layer -> logits (B, S, vocab), present."""
        b, s = ids.shape
        p = past[0].shape[2]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, p + s), np.int64)}
        if self.takes_positions:  # a plain-operator graph (an older export, Optimum's)
            feed["position_ids"] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
        for j, i in enumerate(self.cached_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * j]
            feed[f"past_key_values.{i}.value"] = past[2 * j + 1]
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def generate(self, prompt: list[int], n: int, stop_at_eos: bool = False) -> list[int]:
        """Greedy: prefill the prompt, then one token at a time with the cache."""
        logits, past = self.forward(np.asarray([prompt]), self.empty_past())
        tokens = []
        for _ in range(n):
            token = int(np.argmax(logits[0, -1]))
            tokens.append(token)
            if stop_at_eos and token in self.config["eos_token_ids"]:
                break
            logits, past = self.forward(np.asarray([[token]]), past)
        return tokens


def onnx_perplexity(decoder: OnnxDecoder, tokens: list[int], seq_len: int, max_windows: int | None) -> dict:
    def logits_of(window: list[int]) -> np.ndarray:
        return decoder.forward(np.asarray(window)[None], decoder.empty_past())[0][0, :-1]

    return window_perplexity(logits_of, tokens, seq_len, max_windows)


def measure(folder: Path, evaluation: Evaluation, provider: str = DEFAULT_PROVIDER) -> dict:
    """Everything about one ONNX folder, measured in this process. With ``evaluation.context``, the KV cache
    is filled to that many tokens after the decode (in chunks of CHUNK tokens), so peak RSS is
    that of an app whose context is full."""

    t0 = time.perf_counter()
    decoder = OnnxDecoder(folder, provider, evaluation.threads)
    load_s = time.perf_counter() - t0
    tok = decoder.tokenizer()
    text = text_ids(tok, "builtin")
    prompt = text[:evaluation.prompt_tokens]
    t0 = time.perf_counter()
    logits, past = decoder.forward(np.asarray([prompt]), decoder.empty_past())
    prefill_s = time.perf_counter() - t0
    steps = []
    for _ in range(evaluation.gen_tokens):
        t0 = time.perf_counter()
        logits, past = decoder.forward(np.asarray([[int(np.argmax(logits[0, -1]))]]), past)
        steps.append(time.perf_counter() - t0)
    n_tokens = len(prompt) + evaluation.gen_tokens
    target = (evaluation.context or 0) if evaluation.fill else 0
    fill = text[len(prompt):len(prompt) + max(0, target - n_tokens)]
    for start in range(0, len(fill), CHUNK):
        logits, past = decoder.forward(np.asarray([fill[start:start + CHUNK]]), past)
        n_tokens += len(fill[start:start + CHUNK])
    files = [p for p in Path(folder).iterdir() if p.name.startswith(decoder.config["file"])]
    result = {
        "folder": str(folder), "dtype": decoder.config["dtype"], "provider": provider,
        "file_bytes": sum(p.stat().st_size for p in files), "threads": evaluation.threads or os.cpu_count(),
        "load_s": load_s,
        "prefill": {"tokens": len(prompt), "seconds": prefill_s, "tokens_per_s": len(prompt) / prefill_s},
        "decode": decode_rates(steps),
        "context": n_tokens, "filled": evaluation.fill,
        "peak_rss_bytes": peak_rss_bytes(),  # before the perplexity pass and its full-window logits
    }
    del past, logits
    if evaluation.eval_text is not None and evaluation.eval_windows != 0:
        tokens = text_ids(tok, evaluation.eval_text)
        ppl = onnx_perplexity(decoder, tokens, evaluation.eval_seq_len, evaluation.eval_windows)
        result["perplexity"] = {**ppl, "text": evaluation.eval_text}
    return result


def benchmark(folder: Path, **kwargs) -> dict:
    """measure() in a fresh process (its own peak RSS); returns its result."""
    if not (Path(folder) / "model_config.json").is_file():
        raise UserError(f"not an ONNX folder written by mosaic-export: {folder}")
    return measure_in_subprocess("mosaic_export.targets.onnx.runner", folder,
                                 "ONNX Runtime", **kwargs)


def logits_and_greedy(folder: Path, ids: list[int], prompt_tokens: int, gen_tokens: int,
                      threads: int | None) -> tuple[np.ndarray, list[int], dict]:
    """In a child process: ONNX Runtime's logits on ids (positions x vocab), its greedy tokens
    after the first prompt_tokens, and ONNX Runtime GenAI's check of them (onnx_genai.check)."""
    with tempfile.TemporaryDirectory(prefix="mosaic-parity-") as tmp:
        (Path(tmp) / "ids.json").write_text(json.dumps(ids))
        options = {"job": "parity", "ids": Path(tmp) / "ids.json", "logits": Path(tmp) / "logits.npy",
                   "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": threads}
        result = run_child(MODULE, [str(folder), *option_args(options)], "ONNX Runtime", "comparing",
                           Path(folder).name)
        return np.load(Path(tmp) / "logits.npy"), result["tokens"], result["genai"]


def _parity_job(folder: Path, ids_file: Path, logits_file: Path, prompt_tokens: int, gen_tokens: int,
                threads: int | None) -> dict:

    ids = json.loads(ids_file.read_text())
    decoder = OnnxDecoder(folder, threads=threads)
    np.save(logits_file, decoder.forward(np.asarray([ids]), decoder.empty_past())[0][0])
    ours = decoder.generate(ids[:prompt_tokens], gen_tokens)
    del decoder  # GenAI loads its own copy
    return {"tokens": ours, "genai": check(folder, ids[:prompt_tokens], ours, threads)}


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    p = argparse.ArgumentParser(prog="python -m mosaic_export.targets.onnx.runner")
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default=DEFAULT_PROVIDER, choices=PROVIDERS)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--no-fill", action="store_true", help="time prefill and decode only: no KV cache fill")
    p.add_argument("--job", choices=("bench", "parity"), default="bench")
    p.add_argument("--ids", type=Path, default=None, help="parity: a JSON list of token ids")
    p.add_argument("--logits", type=Path, default=None, help="parity: where to save the logits (.npy)")
    a = p.parse_args(argv)
    if a.job == "parity":
        return report(lambda: _parity_job(a.folder, a.ids, a.logits, a.prompt_tokens, a.gen_tokens,
                                          a.threads), a.json)
    return report(lambda: measure(a.folder, Evaluation.from_args(a), a.provider), a.json)


if __name__ == "__main__":
    sys.exit(main())
