"""The chat probe (mosaic_export.chat_probe) on several GGUF files: 20 short questions with one
expected word each, asked greedily through llama.cpp with each file's chat template.

    python tools/chat_probe.py dense=/tmp/dense-q8/model-Q8_0.gguf pruned=OUT/model-Q8_0.gguf ... \
        [--json bench/recovery/chat_probe.json]

Prints how many each model answers and, per question, which answered; the JSON keeps every reply.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mosaic_export.chat_probe import QUESTIONS, probe_gguf


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
