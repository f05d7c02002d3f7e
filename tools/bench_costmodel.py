"""Cost model accuracy on this machine: predicted vs measured decode tokens/s and peak RSS.

For each removal target (structured, POD allocation, the format's channel alignment) the plan is
made from one calibration pass, the model is resized to it (the kept heads and channels; weight
values do not change a runtime's cost, so no compensation or fine pruning is done), exported,
and run in the runtime with the context full (the runner's --context). The prediction uses the
profile's calibration, which `mosaic-export profile detect` fitted on other model sizes (uniform
widths), never on these plans.

    python tools/bench_costmodel.py --profile local.toml --formats gguf:Q8_0 gguf:Q4_K_M onnx:fp32 \\
        --targets 0 0.1 0.2 0.3 0.4 0.5 --out bench/costmodel

Writes OUT/results.csv and OUT/results.md (the table in BENCHMARKS.md) and prints the largest
relative error per format. Run it with nothing else on the machine: it measures speed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mosaic_export.calibration import LayerStream
from mosaic_export.costmodel import Format
from mosaic_export.detect import run_format
from mosaic_export.model_io import load_model
from mosaic_export.pipeline import calibration_ids, make_pricing
from mosaic_export.plan import CalibrationSettings, PruneSettings
from mosaic_export.planner import make_plan
from mosaic_export.pod import measure
from mosaic_export.profile import load_profile
from mosaic_export.prune.apply import resize_to_plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="a profile written by `mosaic-export profile detect`")
    p.add_argument("--model", default=None)
    p.add_argument("--formats", nargs="+", default=["gguf:Q8_0", "gguf:Q4_K_M", "onnx:fp32"])
    p.add_argument("--targets", nargs="+", type=float, default=[0, 0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/costmodel"))
    a = p.parse_args()
    profile = load_profile(a.profile)
    context = profile.budgets.context
    dense = load_model(a.model)
    base = PruneSettings(sparsity=0.0, calibration=CalibrationSettings(n_samples=8, seq_len=256))
    stream = LayerStream(dense.model, dense.spec, calibration_ids(dense, base), 1)
    measured = measure(stream, dense.spec, dense.shape, base.outlier_m)
    del stream
    rows = []
    for spec in a.formats:
        target, _, name = spec.partition(":")
        fmt = Format(target, name)
        pricing = make_pricing(profile, fmt, dense)
        align = fmt.spec.alignment(name)
        for t in a.targets:
            s = replace(base, sparsity=t, structured_fraction=1.0 if t else 0.0, alignment=align)
            plan = make_plan(dense.shape, dense.source, measured, s)
            pred = pricing.cost([lp.dims for lp in plan.layers])
            loaded = copy.deepcopy(dense)
            resize_to_plan(loaded, plan)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                r = run_format(loaded, fmt, Path(tmp), context, a.threads)
            del loaded
            row = {"format": fmt.key, "target": t, "removed": plan.removed(),
                   "weight_bytes": pred.weight_bytes, "file_bytes": r["file_bytes"],
                   "decode_pred": pred.decode_tokens_per_s, "decode_meas": r["decode"]["tokens_per_s"],
                   "rss_pred": pred.memory_bytes, "rss_meas": r["peak_rss_bytes"],
                   "prefill_pred": pred.prefill_tokens_per_s, "prefill_meas": r["prefill"]["tokens_per_s"],
                   "context": r["context"]}
            row["decode_err"] = row["decode_pred"] / row["decode_meas"] - 1
            row["rss_err"] = row["rss_pred"] / row["rss_meas"] - 1
            row["prefill_err"] = row["prefill_pred"] / row["prefill_meas"] - 1
            rows.append(row)
            print(f"{fmt.key:<12} {t:.2f}: decode {row['decode_pred']:.1f} pred / "
                  f"{row['decode_meas']:.1f} meas ({row['decode_err']:+.1%}); peak RSS "
                  f"{row['rss_pred'] / 2**20:.1f} / {row['rss_meas'] / 2**20:.1f} MiB "
                  f"({row['rss_err']:+.1%}) ({time.perf_counter() - t0:.0f} s)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| format | removed | decode pred | decode meas | error | peak RSS pred (MiB) | "
             "peak RSS meas (MiB) | error | prefill pred | prefill meas | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['removed']:.1%} | {r['decode_pred']:.1f} | "
                     f"{r['decode_meas']:.1f} | {r['decode_err']:+.1%} | {r['rss_pred'] / 2**20:.1f} | "
                     f"{r['rss_meas'] / 2**20:.1f} | {r['rss_err']:+.1%} | {r['prefill_pred']:.0f} | "
                     f"{r['prefill_meas']:.0f} | {r['prefill_err']:+.1%} |")
    summary = []
    for spec in a.formats:
        mine = [r for r in rows if r["format"] == spec]
        summary.append(f"{spec}: largest |error| decode {max(abs(r['decode_err']) for r in mine):.1%}, "
                       f"peak RSS {max(abs(r['rss_err']) for r in mine):.1%}, prefill "
                       f"{max(abs(r['prefill_err']) for r in mine):.1%} over {len(mine)} plans")
    (a.out / "results.md").write_text("\n".join(lines + [""] + summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
