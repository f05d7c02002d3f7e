"""An exported ONNX folder in ONNX Runtime GenAI (the `onnxruntime-genai` package, installed with
mosaic-export): what an app that ships ONNX LLMs runs. Greedy generation (checked against our own
runner at export: a difference fails the build), and speed and memory measured the runtime's way in a fresh
process, for our folders and for the GenAI model builder's alike:

    python -m mosaic_export.targets.onnx.genai FOLDER [--json OUT] [--prompt-tokens N] [--gen-tokens N]

Prefill: the prompt appended and the first token generated (tokens/s of the prompt); decode: each
further token (median step, as onnx_runner); peak RSS (VmHWM) of the process. The KV cache is one
shared buffer of the search's max_length (prompt + generated tokens), as GenAI sizes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.measure.process import (
    decode_rates,
    die_with_parent,
    measure_in_subprocess,
    peak_rss_bytes,
    report,
)
from mosaic_export.targets.onnx.table import CONFIG_FILE, GENAI_CONFIG_FILE
from mosaic_export.targets.scoring import text_ids


def available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def load(folder: Path, threads: int | None = None):
    """onnxruntime_genai.Model of a folder with genai_config.json, on the CPU, with these threads."""
    import onnxruntime_genai as og

    folder = Path(folder)
    if not (folder / GENAI_CONFIG_FILE).is_file():
        raise UserError(f"{folder}: no {GENAI_CONFIG_FILE} (its layers' KV heads differ; export a plan "
                        "made with --kv-heads keep)")
    config = og.Config(str(folder))
    config.clear_providers()
    if threads:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    try:
        return og.Model(config)
    except Exception as e:  # onnxruntime_genai raises its own types
        raise UserError(f"ONNX Runtime GenAI cannot load {folder}: {str(e).splitlines()[0]}") from None


def _generator(model, prompt: list[int], n: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=0)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    return generator


def greedy(folder: Path, prompt: list[int], n: int, threads: int | None = None) -> list[int]:
    """Up to n greedy tokens after prompt (fewer when GenAI stops at an end-of-sequence token)."""
    generator = _generator(load(folder, threads), prompt, n)
    tokens: list[int] = []
    while len(tokens) < n and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def agrees(ours: list[int], theirs: list[int], eos_ids: list[int]) -> bool:
    """GenAI's tokens are ours, up to where GenAI stopped at an end-of-sequence token."""
    stopped = bool(theirs) and theirs[-1] in eos_ids
    return bool(theirs) and ours[:len(theirs)] == theirs and (len(theirs) == len(ours) or stopped)


def check(folder: Path, prompt: list[int], ours: list[int], threads: int | None) -> dict:
    """ONNX Runtime GenAI loads the folder and generates greedily after the prompt: its tokens
    against our runner's (ours). Not run where the folder has no genai_config.json or GenAI is not
    installed (the optional extra `genai`); a folder GenAI cannot load is an error."""
    if not (Path(folder) / GENAI_CONFIG_FILE).is_file():
        return {"checked": False, "reason": "the layers' KV heads differ (plan with --kv-heads keep)"}
    if not available():
        return {"checked": False, "reason": "not run: onnxruntime-genai is not installed here (the main "
                "install brings it where the platform has a wheel; pip install onnxruntime-genai)"}
    eos = json.loads((Path(folder) / CONFIG_FILE).read_text())["eos_token_ids"]
    theirs = greedy(folder, prompt, len(ours), threads)
    same = [a == b for a, b in zip(ours, theirs, strict=False)]  # GenAI may stop early
    return {"checked": True, "tokens": len(theirs), "identical": agrees(ours, theirs, eos),
            "first_difference": None if all(same) else same.index(False)}


def measure(folder: Path, prompt_tokens: int, gen_tokens: int, threads: int | None) -> dict:
    """Load, prefill and decode in this process, with GenAI; its peak RSS."""
    from tokenizers import Tokenizer

    prompt = text_ids(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")), "builtin")[:prompt_tokens]
    t0 = time.perf_counter()
    model = load(folder, threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    generator = _generator(model, prompt, gen_tokens + 1)
    generator.generate_next_token()
    prefill_s = time.perf_counter() - t0
    steps = []
    for _ in range(gen_tokens):
        t0 = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - t0)
    files = [p for p in Path(folder).iterdir() if p.suffix in (".onnx", ".data")]
    return {"folder": str(folder), "runtime": "onnxruntime-genai", "threads": threads,
            "file_bytes": sum(p.stat().st_size for p in files), "load_s": load_s,
            "prefill": {"tokens": len(prompt), "seconds": prefill_s, "tokens_per_s": len(prompt) / prefill_s},
            "decode": decode_rates(steps), "peak_rss_bytes": peak_rss_bytes()}


def benchmark(folder: Path, **options) -> dict:
    """measure() in a fresh process (its own peak RSS)."""
    return measure_in_subprocess("mosaic_export.targets.onnx.genai", folder, "ONNX Runtime GenAI", **options)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    p = argparse.ArgumentParser(prog="python -m mosaic_export.targets.onnx.genai")
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return report(lambda: measure(a.folder, a.prompt_tokens, a.gen_tokens, a.threads), a.json)


if __name__ == "__main__":
    sys.exit(main())
