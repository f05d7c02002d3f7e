"""Decode speed and memory of a pruned model against the dense one, same target, in one run.

    python tools/bench_speed.py PRUNED_CHECKPOINT [--dense MODEL] --target gguf [--quant Q8_0] [--rounds 5]
    python tools/bench_speed.py PRUNED_CHECKPOINT [--dense MODEL] --target onnx [--dtype fp32] \\
        [--rounds 5] [--measure-time 60] [--precision 0.05]

Both models are exported to the same GGUF type or ONNX dtype, then measured in interleaved rounds
(mosaic_export.decide.benchmarks.measure, the dense model the reference): each round runs both, each in a
fresh runtime process (llama.cpp or ONNX Runtime), in turn and in the reverse order on the next
round, so machine noise hits both alike. Every figure is the median over the rounds with its 95%
order-statistic interval (the confidence reached is stated when too few rounds reach 95%); each
speed-up is the pruned/dense ratio taken within each round, its median and interval over the
rounds. The rounds go on past --rounds until every interval is within --precision of its median,
or until --measure-time would be passed.

The ideal speed-up is the ratio of weight bytes read per generated token: every decoder-layer
weight plus the final norm and the output layer (the token embedding when it is tied), read from
the written files themselves; the embedding table is not counted (one row of it is read per token).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mosaic_export.cli.arguments import add_measurement, measurement_policy
from mosaic_export.decide.benchmarks import export_format, measure
from mosaic_export.decide.costmodel import Format
from mosaic_export.measure.rounds import BENCH_POLICY
from mosaic_export.model.load import load_model
from mosaic_export.targets import get, names

NAMES = ("dense", "pruned")


def mib(v: float) -> str:
    return f"{v / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pruned", help="a resized checkpoint folder (OUT/model)")
    p.add_argument("--dense", default=None, help="the dense model (default: the built-in SmolLM2)")
    p.add_argument("--target", choices=names(), default=names()[0])
    p.add_argument("--quant", default="Q8_0", help="GGUF type (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help="ONNX dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    add_measurement(p, BENCH_POLICY)
    a = p.parse_args(argv)
    policy = measurement_policy(a, BENCH_POLICY)

    target = get(a.target)
    type_ = target.check_type(getattr(a, target.option))
    fmt = Format(a.target, type_)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, source in zip(NAMES, (a.dense, a.pruned), strict=True):
            loaded = load_model(source)
            files[name] = (fmt, export_format(loaded, fmt, Path(tmp) / name))
            print(f"{name}: exported, {target.noun} {type_}", flush=True)
            del loaded
        print(f"measuring dense and pruned in {target.engine}, in interleaved rounds", flush=True)
        m = measure(files, policy, None, a.threads, reference="dense", log=print)
        weights = {name: target.bytes_per_token(path) for name, (_, path) in files.items()}
        sizes = {name: m.runs[name][0]["file_bytes"] for name in files}  # the runtime's model files

    fig = {(n, metric): m.figure(n, metric) for n in NAMES for metric in ("decode", "prefill", "memory")}
    ratio = {metric: m.ratio("pruned", metric) for metric in ("decode", "prefill", "memory")}
    ideal = weights["dense"] / weights["pruned"]
    rss = {n: fig[n, "memory"].median for n in NAMES}
    rss_drop, bytes_drop = rss["dense"] - rss["pruned"], sizes["dense"] - sizes["pruned"]
    result = {
        "target": a.target, "format": type_, "rounds": m.rounds, "seconds": m.seconds, "stopped": m.stopped,
        "weight_bytes_per_token": weights, "file_bytes": sizes,
        # medians over the rounds (their intervals under "intervals")
        "decode_tokens_per_s": {n: fig[n, "decode"].median for n in NAMES},
        "prefill_tokens_per_s": {n: fig[n, "prefill"].median for n in NAMES},
        "peak_rss_bytes": rss,
        # speed-ups: the medians of the per-round pruned/dense ratios (their intervals under "ratios")
        "ideal_speedup": ideal, "decode_speedup": ratio["decode"].median,
        "decode_speedup_over_ideal": ratio["decode"].median / ideal,
        "prefill_speedup": ratio["prefill"].median,
        "rss_drop_bytes": rss_drop, "file_drop_bytes": bytes_drop,
        "rss_drop_over_file_drop": rss_drop / bytes_drop if bytes_drop else None,
        "intervals": {key: {n: fig[n, metric].to_dict() for n in NAMES}
                      for key, metric in (("decode_tokens_per_s", "decode"),
                                          ("prefill_tokens_per_s", "prefill"), ("peak_rss_bytes", "memory"))},
        "ratios": {metric: iv.to_dict() for metric, iv in ratio.items()},  # pruned / dense, per round
        "measured": {n: m.to_dict(n) for n in NAMES},
        "runs": m.runs,
    }

    def one(v: float) -> str:
        return f"{v:.1f}"

    def three(v: float) -> str:
        return f"{v:.3f}"

    print(f"\nmedians [95% intervals] over the interleaved rounds: {m.summary()}")
    print("| | dense | pruned | pruned / dense |\n|---|---|---|---|")
    for label, metric, show in (("decode tokens/s", "decode", one), ("prefill tokens/s", "prefill", one),
                                ("peak RSS (MiB)", "memory", mib)):
        print(f"| {label} | {fig['dense', metric].text(show)} | {fig['pruned', metric].text(show)} | "
              f"{ratio[metric].text(three)} |")
    print(f"\nideal speed-up (weight bytes per token, dense/pruned): {ideal:.3f}")
    print(f"decode speed-up: {ratio['decode'].text(three)}  -> {ratio['decode'].median / ideal:.2f} of ideal")
    print(f"prefill speed-up: {ratio['prefill'].text(three)}")
    drop = f" = {rss_drop / bytes_drop:.2f} of the weight-bytes drop" if bytes_drop else ""
    print(f"peak RSS: dense {mib(rss['dense'])} MiB, pruned {mib(rss['pruned'])} MiB (medians); "
          f"drop {mib(rss_drop)} MiB{drop} ({mib(bytes_drop)} MiB)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
