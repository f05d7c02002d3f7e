"""Quality per byte: dense at every GGUF type against structured pruning at a few types, without
and with recovery, all measured in llama.cpp; and the joint search's quality model checked
against every row.

    python tools/bench_joint.py --profile bench/costmodel/this-machine.toml \\
        --calib-text ../shared/data/wikitext-2/valid.txt --eval-text ../shared/data/wikitext-2/test.txt \\
        --eval-windows 32 --recover-tokens 32768 [--rounds 5] [--measure-time 60] \\
        --json bench/joint/table.json

Rows: the dense model at each of --types; the model pruned by structure (POD composite plan,
compensated, at the type's channel alignment) at each of --levels for each of --pruned-types,
as pruned and after recovery (distillation from the dense model on --recover-text). Each row is
exported by mosaic-export and kept; then all rows are measured in one set of interleaved rounds
(mosaic_export.decide.benchmarks.measure), each run in a fresh llama.cpp process with the context full
(peak RSS at --context tokens, decode and prefill tokens/s after a 512-token prompt), the rows in
turn and in the reverse order on the next round. A row's speed and memory are the medians over the
rounds, with their 95% order-statistic intervals under "intervals" (the rounds go on past --rounds
until every interval is within --precision of its median, or until --measure-time would be
passed); the first round also scores each row on the same --eval-windows windows of --eval-text.
The dense probe perplexities at each type are scored once (one run each, no rounds).

The prediction is the joint search's (mosaic_export/quality.py), built as the main command builds
it, on the probe (8 windows from the end of the evaluation text, disjoint from the first
--eval-windows on WikiText-2 test): the dense model's probe perplexity at each type in
llama.cpp, the structural change measured in PyTorch at the levels on plans at the finest
alignment among --pruned-types, recovery's share measured at the least and the largest level
and interpolated between them; anchored at the dense PyTorch perplexity on the evaluation text.
`--rescore` rebuilds the prediction from the rows, so a change to that rule needs no new run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_tables import joint_labels  # tools/: the table's labels, shared

from mosaic_export.bundle.report import pareto
from mosaic_export.cli.arguments import add_measurement, measurement_policy
from mosaic_export.core.texts import corpus
from mosaic_export.decide import benchmarks
from mosaic_export.decide.costmodel import Format
from mosaic_export.decide.profile import load_profile
from mosaic_export.decide.quality import (
    ProbeRecovery,
    QualityModel,
    StructureProbe,
    log_error,
    measure_structure,
    measure_types,
    median,
    probe_evaluation,
    share_points,
    structure_points,
    write_probe,
)
from mosaic_export.decide.search import make_pricing
from mosaic_export.measure.rounds import BENCH_POLICY, Measurement, Policy
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.passes import measure_model
from mosaic_export.method.plan import CalibrationSettings, PruneSettings
from mosaic_export.method.recover import RecoverSettings, training_windows
from mosaic_export.method.windows import calibration_ids
from mosaic_export.model.load import load_model
from mosaic_export.targets import get as get_target
from mosaic_export.targets.base import Evaluation


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--profile", default="laptop-cpu", help="for the predicted costs beside the measured")
    p.add_argument("--types", nargs="+", default=list(get_target("gguf").search_types))
    p.add_argument("--pruned-types", nargs="+", default=["Q8_0", "Q4_K_M"])
    p.add_argument("--levels", type=float, nargs="+", default=[0.15, 0.30, 0.45])
    p.add_argument("--calib-text", default="builtin")
    p.add_argument("--recover-text", default=None, help="default: the calibration text")
    p.add_argument("--recover-tokens", type=int, default=32768, help="0: no recovered rows")
    p.add_argument("--eval-text", default="builtin-heldout")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rescore", type=Path, default=None,
                   help="recompute the predictions, errors and fronts of a table this tool wrote "
                        "(after a change to the quality model), in place; measures nothing")
    add_measurement(p, BENCH_POLICY)
    a = p.parse_args(argv)
    if a.rescore:
        return finish(json.loads(a.rescore.read_text()), a.rescore)
    policy = measurement_policy(a, BENCH_POLICY)
    t_start = time.perf_counter()

    dense = load_model(a.model)
    settings = PruneSettings(sparsity=0.0, structured_fraction=1.0,
                             calibration=CalibrationSettings(source=a.calib_text))
    calib = calibration_ids(dense, settings)
    measured = measure_model(dense, calib, settings, batch_size=4, error_kinds=frozenset())
    eval_ids = windows(tokenize(dense.tokenizer, corpus(a.eval_text)), 512, a.eval_windows, a.eval_text)
    dense_eval = perplexity(dense.model, eval_ids, a.eval_text, desc="perplexity (dense)").perplexity
    profile = load_profile(a.profile)
    pricings = {t: replace(make_pricing(profile, Format("gguf", t), dense, strict=False),
                           calibration=profile.calibration_near(Format("gguf", t))) for t in a.types}
    rows: list[dict] = []
    recover, train_ids = None, None
    if a.recover_tokens:
        recover = RecoverSettings(tokens=a.recover_tokens, text=a.recover_text or a.calib_text).validate()
        train_ids, _ = training_windows(recover, dense)

    with tempfile.TemporaryDirectory(prefix="bench-joint-") as tmp:
        work = Path(tmp)
        text, probe = write_probe(a.eval_text, dense.tokenizer, work)
        reference = perplexity(dense.model, probe, str(text), desc="probe (dense)").perplexity
        print(f"dense PyTorch: {a.eval_text} {dense_eval:.3f}, probe {reference:.3f}", flush=True)
        # the probe perplexities only: one run of each type, no rounds (its speeds are not used)
        probes = measure_types(dense, "gguf", a.types, work / "probe", probe_evaluation(str(text), a.context),
                               policy=Policy(max_seconds=0.0, least=1, most=1))
        type_deltas = {t: math.log(r["perplexity"]["perplexity"] / reference) for t, r in probes.items()}
        shutil.rmtree(work / "probe", ignore_errors=True)  # the rows' files are exported again, below
        files: dict[int, tuple[Format, Path]] = {}  # row index -> its exported file, measured at the end

        def row(loaded, type_: str, removed: float, recovered: bool, probe_ppl: float | None,
                extra: dict | None = None) -> dict:
            fmt = Format("gguf", type_)
            files[len(rows)] = (fmt, benchmarks.export_format(loaded, fmt, work / "rows" / str(len(rows))))
            cost = pricings[type_].cost(loaded.layer_dims)
            out = {"type": type_, "removed": removed, "recovered": recovered, "probe_perplexity": probe_ppl,
                   "predicted_memory_bytes": cost.memory_bytes,
                   "predicted_decode_tokens_per_s": cost.decode_tokens_per_s, **(extra or {})}
            print(f"{type_:<7} {removed:6.1%} {'recovered' if recovered else '':<9} exported", flush=True)
            rows.append(out)
            return out

        for t in a.types:
            row(dense, t, 0.0, False, probes[t]["perplexity"]["perplexity"])
        finest = min(get_target("gguf").alignment(t) for t in a.pruned_types)
        for t in a.pruned_types:
            align = get_target("gguf").alignment(t)

            def visit(student, r, t=t, align=align):
                timing = "recover_s" if r["recovered"] else "prune_s"
                row(student, t, r["removed"], r["recovered"], r["perplexity"],
                    {"level": r["level"], "alignment": align, timing: r["seconds"]})

            spec = StructureProbe(measured, replace(settings, alignment=align), tuple(sorted(a.levels)),
                                  calib, probe)
            recovery = (ProbeRecovery(recover, tuple(sorted(a.levels)), train_ids=train_ids)
                        if recover else None)
            measure_structure(dense, spec, recovery, visit=visit)

        print(f"measuring {len(files)} rows in llama.cpp, in interleaved rounds (the first also scores "
              f"{a.eval_windows} windows of {a.eval_text})", flush=True)
        m = benchmarks.measure(files, policy, a.context, first=Evaluation(a.eval_text, a.eval_windows),
                               log=print)
        for i, out in enumerate(rows):
            take_medians(out, m, i)

    quality = QualityModel(reference, type_deltas, probe={
        "text": a.eval_text, "from": "the end of the text", "structure_alignment": finest})
    out = {"model": dense.source, "calib_text": a.calib_text, "eval_text": a.eval_text,
           "eval_windows": eval_ids.shape[0], "context": a.context, "profile": a.profile,
           "recover": None if recover is None else {"tokens": recover.tokens, "text": recover.text},
           "dense_pytorch_perplexity": dense_eval, "quality": quality.to_dict(),
           "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t_start,
           "measurement": {"rounds": m.rounds, "seconds": m.seconds, "stopped": m.stopped,
                           "summary": m.summary()},
           "rows": rows}
    return finish(out, a.json)


# row key -> the Measurement's metric, and how it is shown
FIGURES = {"decode_tokens_per_s": ("decode", "{:.1f}", 1.0),
           "prefill_tokens_per_s": ("prefill", "{:.0f}", 1.0),
           "peak_rss_bytes": ("memory", "{:.1f}", 2**20)}


def take_medians(out: dict, m: Measurement, key: int) -> None:
    """A row's measured figures: its file, its speed and memory as the medians over the rounds
    (each one's 95% interval under "intervals") and the perplexity the first round scored."""
    first = m.runs[key][0]
    out.update(file_bytes=first["file_bytes"], context=first["context"], rounds=m.rounds,
               perplexity=first["perplexity"]["perplexity"], intervals={})
    shown = {}
    for name, (metric, fmt, scale) in FIGURES.items():
        iv = m.figure(key, metric)
        out[name] = iv.median
        out["intervals"][name] = iv.to_dict()
        shown[name] = iv.text(lambda v, fmt=fmt, scale=scale: fmt.format(v / scale))
    print(f"{out['type']:<7} {out['removed']:6.1%} {'recovered' if out['recovered'] else '':<9} "
          f"{out['file_bytes'] / 2**20:7.1f} MiB  RSS {shown['peak_rss_bytes']} MiB  "
          f"decode {shown['decode_tokens_per_s']}  prefill {shown['prefill_tokens_per_s']}  "
          f"perplexity {out['perplexity']:.3f}", flush=True)


def quality_of(out: dict) -> QualityModel:
    """The joint search's quality model from the table's rows, as the main command measures it:
    the structural change from the pruned rows at the finest alignment; recovery's share at the
    least and the largest level (the main command's recovery_levels when the competing removals
    span the levels), interpolated between them."""
    q = out["quality"]
    pruned = [r for r in out["rows"]
              if r["removed"] > 0 and r.get("alignment") == q["probe"]["structure_alignment"]]
    levels = [(r["level"], r["removed"], r["probe_perplexity"]) for r in pruned if not r["recovered"]]
    ends = (min(lv for lv, _, _ in levels), max(lv for lv, _, _ in levels)) if levels else ()
    recovered = [(r["removed"], r["probe_perplexity"]) for r in pruned
                 if r["recovered"] and r["level"] in ends]
    structure = structure_points(q["reference"], [(r, p) for _, r, p in levels])
    share = share_points(q["reference"], levels, recovered) if recovered else ()
    return QualityModel(q["reference"], q["type_deltas"], structure, share,
                        {**q["probe"], "recovered_at": list(ends) if recovered else None})


def finish(out: dict, path: Path | None) -> int:
    """Predictions, their errors and the fronts for every row; printed, and written to path."""
    quality = quality_of(out)
    out["quality"] = quality.to_dict()
    rows = out["rows"]
    for r in rows:
        pred = quality.perplexity(r["type"], r["removed"], r["recovered"],
                                  dense=out["dense_pytorch_perplexity"])
        r["predicted_perplexity"] = pred
        r["log_error"] = None if pred is None else log_error(pred, r["perplexity"])
    for key, larger in (("peak_rss_bytes", False), ("decode_tokens_per_s", True)):
        front = set(pareto([(r[key], r["perplexity"]) for r in rows], larger))
        for i, r in enumerate(rows):
            r[f"front_{key}"] = i in front
    errors = [r["log_error"] for r in rows if r["log_error"] is not None]
    out["median_abs_log_error"] = median(errors)
    out["predicted_rows"] = len(errors)
    print(f"median |log predicted - log measured| over {len(errors)} of {len(rows)} rows: "
          f"{out['median_abs_log_error']:.3f}")
    print(table(rows))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    return 0


def table(rows: list[dict]) -> str:
    """The rows as markdown; measured figures as "median [low, high]" (95% interval over the
    interleaved rounds) where the row has its intervals (tables written before: the median alone)."""
    lines = ["| model | file (MiB) | peak RSS (MiB) | decode tokens/s | prefill tokens/s | perplexity | "
             "predicted | front (memory, speed) |", "|---|---|---|---|---|---|---|---|"]

    def cell(r: dict, key: str) -> str:
        _, fmt, scale = FIGURES[key]
        iv = r.get("intervals", {}).get(key)
        if iv is None or iv["n"] == 1:
            return fmt.format(r[key] / scale)
        return f"{fmt.format(iv['median'] / scale)} [{fmt.format(iv['low'] / scale)}, " \
               f"{fmt.format(iv['high'] / scale)}]"

    for r in rows:
        name, front, pred = joint_labels(r)
        lines.append(f"| {name} | {r['file_bytes'] / 2**20:.1f} | {cell(r, 'peak_rss_bytes')} | "
                     f"{cell(r, 'decode_tokens_per_s')} | {cell(r, 'prefill_tokens_per_s')} | "
                     f"{r['perplexity']:.2f} | {pred} | {front} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
