"""One model exported to ONNX at several precisions: parity with PyTorch, greedy generation with the
KV cache against transformers' generate, and perplexity in ONNX Runtime.

    python tools/onnx_check.py [MODEL] --dtypes fp32 fp16 int8 int4 --text FILE [--positions 512] \\
        [--eval-windows 64] [--keep DIR]

MODEL: a resized checkpoint folder, a HF folder or a GGUF source (default: the built-in SmolLM2).
Logits are compared at every position of the first --positions tokens of --text; 64 tokens are
generated greedily after its first 32 tokens; perplexity is measured by the ONNX Runtime runner in
a fresh process on the first --eval-windows 512-token windows of --text. PyTorch's perplexity on
the same windows is printed first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.model.load import load_model
from mosaic_export.targets.onnx.runner import benchmark
from mosaic_export.targets.onnx.writer import export, parity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    p.add_argument("--text", default="builtin-heldout")
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--keep", type=Path, default=None, help="keep the exported folders here")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    loaded = load_model(a.model)
    tokens = tokenize(loaded.tokenizer, corpus(a.text))
    ref = perplexity(loaded.model, windows(tokens, 512, a.eval_windows, a.text), a.text)
    print(f"PyTorch: perplexity {ref.perplexity:.3f}, top-1 {ref.top1:.2%} ({ref.n_predicted} tokens)",
          flush=True)
    rows = [{"dtype": "pytorch", "perplexity": ref.to_dict()}]
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for dtype in a.dtypes:
            folder = export(loaded, root / f"onnx-{dtype}", dtype).parent
            check = parity(loaded, folder, tokens[: a.positions])
            bench = benchmark(folder, eval_text=a.text, eval_windows=a.eval_windows, gen_tokens=16)
            pp = bench["perplexity"]
            greedy = ("identical" if check["greedy_identical"]
                      else f"differ from token {check['greedy_first_difference']}")
            print(f"{dtype}: {bench['file_bytes'] / 2**20:.1f} MiB; max |logit diff| "
                  f"{check['max_abs_logit_diff']:.2e}, greedy next token agrees at "
                  f"{check['top1_agreement']:.2%} of {check['positions']} positions; "
                  f"{check['greedy_tokens']} generated tokens {greedy}; "
                  f"perplexity {pp['perplexity']:.3f}, top-1 {pp['top1']:.2%} ({pp['n_predicted']} "
                  f"tokens); ONNX Runtime GenAI: {_genai(check['genai'])}", flush=True)
            rows.append({"dtype": dtype, "file_bytes": bench["file_bytes"], "parity": check,
                         "perplexity": pp})
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _genai(check: dict) -> str:
    if not check["checked"]:
        return f"not checked ({check['reason']})"
    return "same greedy tokens" if check["identical"] else f"differs from token {check['first_difference']}"


if __name__ == "__main__":
    sys.exit(main())
