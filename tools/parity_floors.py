"""Greedy next-token agreement with PyTorch of every GGUF type and ONNX dtype, for the dense
default model and a pruned one, on the build's parity window (the first calibration window of the
built-in text, 512 tokens): the figures the parity floors (targets/gguf.py and targets/onnx.py
MIN_AGREEMENT) are set from.

    python tools/parity_floors.py --pruned OUT/model [--onnx] [--out bench/parity]

OUT/model: a checkpoint written by mosaic-export (for example `--sparsity 0.3
--structured-fraction 1 --align 256 --target none`; 256 keeps every k-quant free of fallbacks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mosaic_export.method.plan import PruneSettings
from mosaic_export.method.windows import calibration_ids
from mosaic_export.model.load import load_model
from mosaic_export.targets.gguf import table as gguf_table
from mosaic_export.targets.gguf import writer as gguf
from mosaic_export.targets.gguf.runner import next_token_agreement
from mosaic_export.targets.onnx import writer as onnx


def agreements(loaded, ids, with_onnx: bool) -> dict[str, dict]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in gguf_table.TYPES:
            path = Path(tmp) / f"m-{quant}.gguf"
            gguf.export(loaded, path, quant)
            r = next_token_agreement(loaded.model, path, ids)
            path.unlink()
            floor = gguf_table.MIN_AGREEMENT[quant]
            out[f"gguf {quant}"] = {"agreement": r["top1_agreement"], "floor": floor,
                                    "max_abs_logit_diff": r["max_abs_logit_diff"]}
            print(f"  gguf {quant:<7} {r['top1_agreement']:.1%}", flush=True)
        if with_onnx:
            for dtype in onnx.MIN_AGREEMENT:
                folder = Path(tmp) / f"onnx-{dtype}"
                onnx.export(loaded, folder, dtype)
                r = onnx.parity(loaded, folder, ids)
                out[f"onnx {dtype}"] = {"agreement": r["top1_agreement"],
                                        "floor": onnx.MIN_AGREEMENT[dtype],
                                        "max_abs_logit_diff": r["max_abs_logit_diff"]}
                print(f"  onnx {dtype:<7} {r['top1_agreement']:.1%}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", type=Path, required=True, help="a pruned checkpoint (OUT/model)")
    p.add_argument("--onnx", action="store_true", help="also the ONNX dtypes (minutes each)")
    p.add_argument("--out", type=Path, default=Path("bench/parity"))
    a = p.parse_args()
    results = {}
    for name, source in (("dense", None), ("pruned", str(a.pruned))):
        loaded = load_model(source)
        ids = calibration_ids(loaded, PruneSettings())[0]
        print(f"{name}: {loaded.source}", flush=True)
        results[name] = agreements(loaded, ids, a.onnx)
        del loaded
    rows = ["| format | dense | pruned | floor |", "|---|---|---|---|"]
    for key in results["dense"]:
        d, q = results["dense"][key], results["pruned"][key]
        rows.append(f"| {key} | {d['agreement']:.1%} | {q['agreement']:.1%} | {d['floor']:.0%} |")
    table = "\n".join(rows)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table.md").write_text(table + "\n")
    (a.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
