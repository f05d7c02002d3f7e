"""Perplexity through llama.cpp of one model exported to several GGUF types.

    python tools/gguf_quality.py [MODEL] --types F16 Q8_0 Q4_K_M --eval-text FILE [--eval-windows 128]

Each type is exported by mosaic-export's writer (quantized ones by llama.cpp's quantizer), its
tensor types read back (fallbacks listed), then benchmarked in a fresh llama.cpp process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mosaic_export.model.load import load_model
from mosaic_export.targets.gguf.runner import benchmark
from mosaic_export.targets.gguf.writer import export


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    p.add_argument("--eval-text", default="builtin-heldout")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    loaded = load_model(a.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in a.types:
            path = Path(tmp) / f"model-{t}.gguf"
            check = export(loaded, path, t)
            r = benchmark(path, eval_text=a.eval_text, eval_windows=a.eval_windows, gen_tokens=32)
            rows.append({"type": t, "file_bytes": r["file_bytes"], "tensor_types": check.summary(),
                         "fallbacks": check.fallbacks, "perplexity": r["perplexity"]})
            ppl = r["perplexity"]
            print(f"{t:<7} {r['file_bytes'] / 2**20:7.1f} MiB  perplexity {ppl['perplexity']:.3f} "
                  f"({ppl['n_predicted']} tokens)  types {check.summary()}  "
                  f"fallbacks {len(check.fallbacks)}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
