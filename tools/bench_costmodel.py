"""Cost model accuracy on this machine: predicted vs measured decode tokens/s and peak RSS.

For each removal target (structured, POD allocation, the format's channel alignment) the plan is
made from one calibration pass, the model is resized to it (the kept heads and channels; weight
values do not change a runtime's cost, so no compensation or fine pruning is done) and exported.
Then every plan of every format is measured in one set of interleaved rounds
(mosaic_export.decide.benchmarks.measure), each run in a fresh process of its runtime with the context
full (the profile's budget context): each round runs every file in turn, in the reverse order on
the next round, so that a slow spell of the machine hits every plan alike. The measured figures
are medians over the rounds with their 95% order-statistic intervals (``*_meas_low``,
``*_meas_high``); the rounds go on past --rounds until every interval is within --precision of its
median, or until --measure-time would be passed. The prediction uses the profile's calibration,
which `mosaic-export profile detect` fitted on other model sizes (uniform widths), never on these
plans. Every exported file stays on disk until the rounds end (a few GB for fp32).

    python tools/bench_costmodel.py --profile local.toml --formats gguf:Q8_0 gguf:Q4_K_M onnx:fp32 \\
        --targets 0 0.1 0.2 0.3 0.4 0.5 [--rounds 5] [--measure-time 600] --out bench/costmodel

Writes OUT/results.csv and OUT/results.md (the table in BENCHMARKS.md: measured cells are
"median [low, high]") and prints the largest relative error (predicted / median - 1) per format.
Run it with nothing else on the machine: it measures speed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from mosaic_export.cli.arguments import add_measurement, measurement_policy
from mosaic_export.decide import benchmarks
from mosaic_export.decide.costmodel import Format
from mosaic_export.decide.profile import load_profile
from mosaic_export.decide.search import make_pricing
from mosaic_export.measure.rounds import BENCH_POLICY
from mosaic_export.method.passes import measure_model
from mosaic_export.method.plan import CalibrationSettings, PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.method.prune.apply import resize_to_plan
from mosaic_export.method.windows import calibration_ids
from mosaic_export.model.load import load_model

# result column -> (the Measurement's metric, the prediction's column)
MEASURED = {"decode_meas": ("decode", "decode_pred"), "rss_meas": ("memory", "rss_pred"),
            "prefill_meas": ("prefill", "prefill_pred")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="a profile written by `mosaic-export profile detect`")
    p.add_argument("--model", default=None)
    p.add_argument("--formats", nargs="+", default=["gguf:Q8_0", "gguf:Q4_K_M", "onnx:fp32"])
    p.add_argument("--targets", nargs="+", type=float, default=[0, 0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/costmodel"))
    add_measurement(p, BENCH_POLICY)
    a = p.parse_args()
    policy = measurement_policy(a, BENCH_POLICY)
    profile = load_profile(a.profile)
    context = profile.budgets.context
    dense = load_model(a.model)
    base = PruneSettings(sparsity=0.0, calibration=CalibrationSettings(n_samples=8, seq_len=256))
    measured = measure_model(dense, calibration_ids(dense, base), base, error_kinds=frozenset())
    rows: dict[str, dict] = {}  # candidate key -> its row (the prediction first, then the medians)
    with tempfile.TemporaryDirectory(prefix="bench-costmodel-") as tmp:
        files: dict[str, tuple[Format, Path]] = {}
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
                key = f"{fmt.key} {t:g}"
                work = Path(tmp) / f"{target}-{name}-{t:g}"
                files[key] = (fmt, benchmarks.export_format(loaded, fmt, work))
                del loaded
                rows[key] = {"format": fmt.key, "target": t, "removed": plan.removed(),
                             "weight_bytes": pred.weight_bytes, "decode_pred": pred.decode_tokens_per_s,
                             "rss_pred": pred.memory_bytes, "prefill_pred": pred.prefill_tokens_per_s}
                print(f"{fmt.key:<12} {t:.2f}: exported ({plan.removed():.1%} removed)", flush=True)
        print(f"measuring {len(files)} files in interleaved rounds, the context full ({context} tokens)",
              flush=True)
        m = benchmarks.measure(files, policy, context, a.threads, log=print)
    for key, row in rows.items():
        first = m.runs[key][0]
        row.update(file_bytes=first["file_bytes"], context=first["context"], rounds=m.rounds)
        for column, (metric, _) in MEASURED.items():
            iv = m.figure(key, metric)
            row.update({column: iv.median, f"{column}_low": iv.low, f"{column}_high": iv.high})
        for column, (_, pred) in MEASURED.items():
            row[column.replace("_meas", "_err")] = row[pred] / row[column] - 1
        print(f"{row['format']:<12} {row['target']:.2f}: decode {row['decode_pred']:.1f} pred / "
              f"{m.figure(key, 'decode').text(lambda v: f'{v:.1f}')} meas ({row['decode_err']:+.1%}); "
              f"peak RSS {row['rss_pred'] / 2**20:.1f} / "
              f"{m.figure(key, 'memory').text(lambda v: f'{v / 2**20:.1f}')} MiB ({row['rss_err']:+.1%})",
              flush=True)
    rows_out = list(rows.values())
    a.out.mkdir(parents=True, exist_ok=True)
    fields = ["format", "target", "removed", "weight_bytes", "file_bytes", "decode_pred", "decode_meas",
              "rss_pred", "rss_meas", "prefill_pred", "prefill_meas", "context", "decode_err", "rss_err",
              "prefill_err", "decode_meas_low", "decode_meas_high", "rss_meas_low", "rss_meas_high",
              "prefill_meas_low", "prefill_meas_high", "rounds"]
    with open(a.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows_out)

    def cell(r: dict, column: str, fmt: str, scale: float = 1.0) -> str:
        """'112.1 [110.4, 113.0]': the median over the rounds and its interval."""
        low, high = r[f"{column}_low"], r[f"{column}_high"]
        show = fmt.format(r[column] / scale)
        return show if r["rounds"] == 1 else f"{show} [{fmt.format(low / scale)}, {fmt.format(high / scale)}]"

    lines = [f"Measured: median and 95% interval over {m.rounds} interleaved rounds ({m.summary()}).", "",
             "| format | removed | decode pred | decode meas | error | peak RSS pred (MiB) | "
             "peak RSS meas (MiB) | error | prefill pred | prefill meas | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['format']} | {r['removed']:.1%} | {r['decode_pred']:.1f} | "
                     f"{cell(r, 'decode_meas', '{:.1f}')} | {r['decode_err']:+.1%} | "
                     f"{r['rss_pred'] / 2**20:.1f} | {cell(r, 'rss_meas', '{:.1f}', 2**20)} | "
                     f"{r['rss_err']:+.1%} | {r['prefill_pred']:.0f} | {cell(r, 'prefill_meas', '{:.0f}')} | "
                     f"{r['prefill_err']:+.1%} |")
    summary = []
    for spec in a.formats:
        mine = [r for r in rows_out if r["format"] == spec]
        summary.append(f"{spec}: largest |error| decode {max(abs(r['decode_err']) for r in mine):.1%}, "
                       f"peak RSS {max(abs(r['rss_err']) for r in mine):.1%}, prefill "
                       f"{max(abs(r['prefill_err']) for r in mine):.1%} over {len(mine)} plans")
    (a.out / "results.md").write_text("\n".join(lines + [""] + summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
