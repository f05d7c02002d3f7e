"""The chat probe (mosaic_export.method.chat_probe) on several GGUF files: 20 short questions with one
expected word each, asked greedily through llama.cpp with each file's chat template.

    python tools/chat_probe.py dense=/tmp/dense-q8/model-Q8_0.gguf pruned=OUT/model-Q8_0.gguf ... \
        [--json bench/recovery/chat_probe.json]

Prints how many each model answers and, per question, which answered; the JSON keeps every reply.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mosaic_export.method.chat_probe import MAX_TOKENS, QUESTIONS, score
from mosaic_export.targets.gguf.runner import run_llama
from mosaic_export.targets.gguf.table import GENERATE_CONTEXT


def probe_gguf(path: Path, threads: int | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    """Ask the questions to a GGUF file in llama.cpp (in a child process), greedily, with the
    file's chat template and the context `mosaic-export run` uses."""
    with tempfile.TemporaryDirectory(prefix="mosaic-probe-") as tmp:
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps([q for q, _ in QUESTIONS]))
        out = run_llama("generate", Path(path), prompts=prompts, max_tokens=max_tokens,
                        threads=threads, context=GENERATE_CONTEXT)
    return score(out["texts"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=FILE.gguf")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    results = {}
    for spec in a.models:
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"expected NAME=FILE.gguf, got {spec!r}")
        results[name] = {"file": path, **probe_gguf(Path(path), a.threads)}
        r = results[name]
        print(f"{name}: {r['answered']}/{r['questions']} answered, {r['replied']} replies not empty",
              flush=True)
    names = list(results)
    width = max(len(q) for q, _ in QUESTIONS)
    print(f"\n{'question':<{width}}  " + "  ".join(f"{n:>8}" for n in names))
    for i, (q, _) in enumerate(QUESTIONS):
        print(f"{q:<{width}}  " + "  ".join(f"{'yes' if results[n]['rows'][i]['answered'] else '-':>8}"
                                           for n in names))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
