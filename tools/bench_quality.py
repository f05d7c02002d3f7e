"""Quality benchmark: perplexity against removed decoder parameters, one curve per method.

    python tools/bench_quality.py --calib-text ../shared/data/wikitext-2/valid.txt \\
        --eval-text ../shared/data/wikitext-2/test.txt --out bench/quality [--seeds 0 1]

Stages (each row is appended to OUT/results.csv as soon as it is measured; a second run skips the
rows already there, so an interrupted benchmark resumes):
- timing: one dense forward pass over the calibration set against the whole prune (both passes,
  plan included) with Wanda scoring, and their ratio;
- tune: M and lambda of every allocation with knobs (layer, projection, joint, layer+type) and
  of the composite structured plans, chosen by perplexity on --tune-text (WikiText-2 valid) only:
  lambda first (at M = 5), then M at the best lambda, 5 runs each; the `error` allocation (also
  the composite plan by errors) has no M (it reads no outliers) and gets its 5 runs on lambda;
- unstructured: 50-80% sparsity, Wanda and SparseGPT, by allocation: uniform, layer (OWL),
  projection (OWL per type), joint (OWL over all cells), error (measured errors, knapsack);
  layer+type (the authors' layer vector plus type offset) at the headline sparsity only;
- structured: 20-40% fewer decoder parameters, none recovered: (b) the same ratio in every
  layer, activation-aware scores and least-squares compensation; (c) composite projection
  pruning: POD allocation over layers and attention / MLP groups, activation-aware, compensated;
  the same with the `error` allocation (each layer's head layout and MLP width chosen by the
  measured, compensated output errors of o and down: planner._error_groups);
  whole blocks (mosaic_export/blocks.py: attention blocks and whole layers, the remainder below one
  block as unstructured Wanda zeros); FLAP-style (uniform and adaptive) and LLM-Pruner-style
  (mosaic_export/baselines.py); at the headline only, magnitude ranking without compensation
  (the weakest, kept with that label);
- the sweep runs the headline rows first (70% unstructured, 30% structured), then the other
  structured points (fewer rows), then the unstructured headline again with every other --seeds
  value, then the other unstructured points. With --eval-text-2, each swept model is also scored
  on a second text (another domain).

The measure pass (POD and scores of the dense model) depends only on the calibration sample and
M, so it runs once per (seed, M) and every plan is made from it; its time is added to each row's
prune time. Results: results.csv, results.md (tables) and quality.png (the plot); with
--lm-eval-tasks, the zero-shot accuracy of every swept model in zero_shot.jsonl (see
mosaic_export/zero_shot.py).
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from baselines import BASELINES

from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import sample_windows, tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.passes import apply_to_model, measure_model, prune_model
from mosaic_export.method.plan import CalibrationSettings, PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.model.load import load_model

UNSTRUCTURED = [0.5, 0.6, 0.7, 0.8]
STRUCTURED = [0.2, 0.3, 0.4]
HEADLINE = {"unstructured": 0.7, "structured": 0.3}
TUNE_M = [3.0, 5.0, 8.0]
TUNE_LAMBDA = [0.04, 0.08, 0.15]
ERROR_LAMBDA = [0.04, 0.08, 0.15, 0.25, 0.4]  # the same 5 runs as lambda x M for the others
FIELDS = ["stage", "suite", "label", "sparsity", "seed", "outlier_m", "lam", "removed",
          "decoder_params", "perplexity", "top1", "eval_text", "eval_tokens", "prune_s", "eval_s",
          "perplexity_2", "top1_2", "eval_text_2"]

# label -> settings that define the method (sparsity, seed, M, lambda are set per row)
ALLOCATIONS = ["uniform", "layer", "projection", "joint", "layer+type", "error"]
COMPOSITE = "(c) composite (POD), activation-aware, comp."
COMPOSITE_ERROR = "(c) composite, error allocation (measured, knapsack), comp."
METHODS = {
    **{f"{a}+{m}": dict(allocation=a, method=m) for m in ("wanda", "sparsegpt") for a in ALLOCATIONS},
    "magnitude: uniform, weights only, no comp.": dict(
        allocation="uniform", structured_fraction=1.0, structured_scores="magnitude", compensate=False),
    "(b) uniform, activation-aware, comp.": dict(allocation="uniform", structured_fraction=1.0),
    COMPOSITE: dict(allocation="projection", structured_fraction=1.0),
    COMPOSITE_ERROR: dict(allocation="error", structured_fraction=1.0),
    "whole blocks: attention / layers by residual energy": dict(allocation="uniform", structure="blocks",
                                                                structured_fraction=1.0),
    "FLAP-style: fluctuation, uniform, bias comp.": dict(baseline="flap", structured_fraction=1.0),
    "FLAP-style adaptive: fluctuation, AL-AM, bias comp.": dict(baseline="flap-adaptive",
                                                                structured_fraction=1.0),
    "LLM-Pruner-style: Taylor, first 4 / last 2 kept, no LoRA": dict(baseline="llm-pruner",
                                                                     structured_fraction=1.0),
}
HEADLINE_ONLY = {"layer+type+wanda", "layer+type+sparsegpt", "magnitude: uniform, weights only, no comp."}
SUITE = {label: ("structured" if "structured_fraction" in kw else "unstructured")
         for label, kw in METHODS.items()}
TUNED = {**{f"{a}+{m}": a for m in ("wanda", "sparsegpt") for a in ALLOCATIONS if a != "uniform"},
         COMPOSITE: "composite", COMPOSITE_ERROR: "composite-error"}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.loaded = load_model(args.model)
        tok = self.loaded.tokenizer
        self.calib_tokens = tokenize(tok, corpus(args.calib_text))
        self.eval_ids = windows(tokenize(tok, corpus(args.eval_text)), args.seq_len, args.eval_windows,
                                args.eval_text)
        self.tune_ids = windows(tokenize(tok, corpus(args.tune_text)), args.seq_len, args.tune_windows,
                                args.tune_text)
        self.eval2_ids = None
        if args.eval_text_2:
            self.eval2_ids = windows(tokenize(tok, corpus(args.eval_text_2)), args.seq_len,
                                     args.eval_windows_2, args.eval_text_2)
        self.measured: dict[tuple[int, float, frozenset[str]], tuple[list, float]] = {}
        self.csv = args.out / "results.csv"
        self.rows = list(csv.DictReader(self.csv.open())) if self.csv.exists() else []
        if self.csv.exists() and next(csv.reader(self.csv.open()), []) != FIELDS:
            sys.exit(f"{self.csv} was written with other columns (an older version): use another --out")

    def calibration(self, seed: int) -> torch.Tensor:
        return sample_windows(self.calib_tokens, self.args.calib_samples, self.args.seq_len, seed,
                              source=self.args.calib_text)

    def measurements(self, seed: int, outlier_m: float, errors: frozenset[str] = frozenset()):
        """Pass 1 at (seed, M) with the errors asked (PruneSettings.error_kinds); a pass made with
        more errors serves a row that asks fewer when the row's own pass was not made, and the row
        is charged that pass's time."""
        own = self.measured.get((seed, outlier_m, errors))
        if own is not None:
            return own
        for (s, m, kinds), made in self.measured.items():
            if (s, m) == (seed, outlier_m) and kinds >= errors:
                return made
        t0 = time.perf_counter()
        result = measure_model(self.loaded, self.calibration(seed), PruneSettings(outlier_m=outlier_m),
                               error_kinds=errors)
        self.measured[(seed, outlier_m, errors)] = (result, time.perf_counter() - t0)
        return self.measured[(seed, outlier_m, errors)]

    def done(self, stage: str, label: str, sparsity: float, seed: int, m: float, lam: float) -> dict | None:
        for r in self.rows:
            if (r["stage"], r["label"], float(r["sparsity"]), int(r["seed"]), float(r["outlier_m"]),
                    float(r["lam"])) == (stage, label, sparsity, seed, m, lam):
                return r
        return None

    def run(self, stage: str, label: str, sparsity: float, seed: int, m: float, lam: float) -> dict:
        """Prune a copy of the dense model by one method and score it; cached in results.csv."""
        row = self.done(stage, label, sparsity, seed, m, lam)
        if row is not None:
            return row
        t0 = time.perf_counter()
        model = copy.deepcopy(self.loaded.model)
        copy_s = time.perf_counter() - t0
        model, prune_s, measure_s = self.prune(model, label, sparsity, seed, m, lam)
        layers = self.loaded.spec.layer_list(model)
        nonzero = sum(int(torch.count_nonzero(p)) for p in layers.parameters())
        shape = self.loaded.shape
        dense_params = shape.n_layers * shape.layer_params(shape.dense_dims)
        resized = sum(p.numel() for p in layers.parameters())
        ids, text = (self.tune_ids, self.args.tune_text) if stage == "tune" else (self.eval_ids,
                                                                               self.args.eval_text)
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, text, desc=f"perplexity {label} {sparsity}")
        eval_s = time.perf_counter() - t0
        second = {"perplexity_2": "", "top1_2": "", "eval_text_2": ""}
        if stage == "sweep" and self.eval2_ids is not None:
            p2 = perplexity(model, self.eval2_ids, self.args.eval_text_2, desc="perplexity (text 2)")
            second = {"perplexity_2": f"{p2.perplexity:.3f}", "top1_2": f"{p2.top1:.4f}",
                      "eval_text_2": Path(self.args.eval_text_2).name}
        if self.args.lm_eval_tasks and stage == "sweep":
            self.zero_shot(model, {"label": label, "sparsity": sparsity, "seed": seed})
        del model
        row = {"stage": stage, "suite": SUITE[label], "label": label, "sparsity": sparsity,
               "seed": seed, "outlier_m": m, "lam": lam,
               "removed": f"{1 - nonzero / dense_params:.4f}",
               "decoder_params": resized, "perplexity": f"{ppl.perplexity:.3f}",
               "top1": f"{ppl.top1:.4f}", "eval_text": Path(text).name, "eval_tokens": ppl.n_predicted,
               "prune_s": f"{prune_s:.1f}", "eval_s": f"{eval_s:.1f}", **second}
        print(f"[{stage}] {label:<46} {sparsity:.0%} seed {seed} M {m:g} lambda {lam:g}: "
              f"removed {float(row['removed']):.1%}, perplexity {ppl.perplexity:.3f}, top-1 "
              f"{ppl.top1:.2%}{'; text 2 ' + second['perplexity_2'] if second['perplexity_2'] else ''} "
              f"(prune {prune_s:.0f} s incl. measure {measure_s:.0f} s, copy {copy_s:.1f} s, eval "
              f"{eval_s:.0f} s)", flush=True)
        self.append(row)
        return row

    def prune(self, model, label: str, sparsity: float, seed: int, m: float, lam: float):
        """(the pruned model, prune seconds including pass 1, pass 1's seconds)."""
        kw = dict(METHODS[label])
        baseline = kw.pop("baseline", None)
        calib = self.calibration(seed)
        spec, shape = self.loaded.spec, self.loaded.shape
        if baseline is not None:
            t0 = time.perf_counter()
            BASELINES[baseline](model, spec, shape, calib, sparsity)
            return model, time.perf_counter() - t0, 0.0
        settings = PruneSettings(sparsity=sparsity, outlier_m=m, lam=lam, **kw,
                                 calibration=CalibrationSettings(self.args.calib_text,
                                                                 self.args.calib_samples,
                                                                 self.args.seq_len, seed)).validate()
        measured, measure_s = self.measurements(seed, m, settings.error_kinds())
        t0 = time.perf_counter()
        plan = make_plan(shape, self.loaded.source, measured, settings)
        apply_to_model(replace(self.loaded, model=model), plan, calib)
        return model, measure_s + time.perf_counter() - t0, measure_s

    def zero_shot(self, model, key: dict) -> None:
        """lm-evaluation-harness tasks on one pruned model, appended to OUT/zero_shot.jsonl."""
        import json

        from zero_shot import zero_shot

        for r in zero_shot(model, self.loaded.tokenizer, self.args.lm_eval_tasks, self.args.lm_eval_limit):
            print(f"[zero-shot] {key['label']} {key['sparsity']:.0%}: {r['task']}: "
                  f"{r['metrics'] if r['status'] == 'ok' else 'skipped, ' + r['reason']}", flush=True)
            with (self.args.out / "zero_shot.jsonl").open("a") as f:
                f.write(json.dumps({**key, **r}) + "\n")

    def append(self, row: dict) -> None:
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})

    def dense_row(self) -> dict:
        for r in self.rows:
            if r["stage"] == "dense":
                return r
        t0 = time.perf_counter()
        ppl = perplexity(self.loaded.model, self.eval_ids, self.args.eval_text, desc="perplexity dense")
        n = sum(p.numel() for p in self.loaded.spec.layer_list(self.loaded.model).parameters())
        row = {"stage": "dense", "suite": "dense", "label": "dense", "sparsity": 0.0, "seed": 0,
               "outlier_m": 0, "lam": 0, "removed": "0.0000", "decoder_params": n,
               "perplexity": f"{ppl.perplexity:.3f}", "top1": f"{ppl.top1:.4f}",
               "eval_text": Path(self.args.eval_text).name, "eval_tokens": ppl.n_predicted,
               "prune_s": "0", "eval_s": f"{time.perf_counter() - t0:.1f}",
               "perplexity_2": "", "top1_2": "", "eval_text_2": ""}
        if self.eval2_ids is not None:
            p2 = perplexity(self.loaded.model, self.eval2_ids, self.args.eval_text_2, desc="text 2")
            row.update(perplexity_2=f"{p2.perplexity:.3f}", top1_2=f"{p2.top1:.4f}",
                       eval_text_2=Path(self.args.eval_text_2).name)
        print(f"[dense] perplexity {ppl.perplexity:.3f}, top-1 {ppl.top1:.2%}"
              f"{'; text 2 ' + row['perplexity_2'] if row['perplexity_2'] else ''}", flush=True)
        self.append(row)
        return row

    # --- stages ----------------------------------------------------------------------------------

    def timing(self) -> None:
        """One dense forward over the calibration set vs the whole prune with Wanda (one run)."""
        model, seed = self.loaded.model, self.args.seeds[0]
        calib = self.calibration(seed)
        with torch.no_grad():
            t0 = time.perf_counter()
            for sample in calib.split(1):
                model(input_ids=sample, use_cache=False)
            forward_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for sample in calib.split(1):
                model.get_decoder()(input_ids=sample, use_cache=False)
            decoder_s = time.perf_counter() - t0
        pruned = copy.deepcopy(model)
        settings = PruneSettings(sparsity=0.5, calibration=CalibrationSettings(
            self.args.calib_text, self.args.calib_samples, self.args.seq_len, seed)).validate()
        t0 = time.perf_counter()
        prune_model(replace(self.loaded, model=pruned), calib, settings)
        prune_s = time.perf_counter() - t0
        del pruned
        n = calib.numel()
        print(f"[timing] calibration {calib.shape[0]} x {calib.shape[1]} = {n} tokens, "
              f"{torch.get_num_threads()} threads: dense forward {forward_s:.1f} s (decoder only "
              f"{decoder_s:.1f} s); prune (50% unstructured, projection, Wanda) {prune_s:.1f} s; "
              f"ratio {prune_s / forward_s:.2f}x the full forward, {prune_s / decoder_s:.2f}x the "
              f"decoder-only forward", flush=True)
        with (self.args.out / "timing.txt").open("a") as f:
            f.write(f"tokens={n} threads={torch.get_num_threads()} forward_s={forward_s:.2f} "
                    f"decoder_forward_s={decoder_s:.2f} prune_s={prune_s:.2f} "
                    f"ratio={prune_s / forward_s:.3f} ratio_decoder={prune_s / decoder_s:.3f}\n")

    def tune(self) -> dict[str, tuple[float, float]]:
        """Best (M, lambda) per tuned allocation, by perplexity on the tuning text: lambda over
        TUNE_LAMBDA at the default M, then M over TUNE_M at that lambda (coordinate search)."""
        seed, best, d = self.args.seeds[0], {}, PruneSettings()
        tuned = [(f"{a}+wanda", HEADLINE["unstructured"]) for a in ALLOCATIONS if a != "uniform"]
        structured = [(COMPOSITE, HEADLINE["structured"]), (COMPOSITE_ERROR, HEADLINE["structured"])]
        for label, sparsity in structured + tuned:
            if TUNED[label] in self.args.fixed_knobs:  # tuned before, on the same grid
                best[TUNED[label]] = self.args.fixed_knobs[TUNED[label]]
                print(f"[tune] {label}: M, lambda {best[TUNED[label]]} given (--fixed-knobs)", flush=True)
                continue

            def score(m: float, lam: float, label=label, sparsity=sparsity) -> tuple[float, float, float]:
                return float(self.run("tune", label, sparsity, seed, m, lam)["perplexity"]), m, lam

            if METHODS[label].get("allocation") == "error":  # no M: the same 5 runs on lambda
                ppl, m, lam = min(score(d.outlier_m, lam) for lam in ERROR_LAMBDA)
            else:
                _, _, lam = min(score(d.outlier_m, lam) for lam in TUNE_LAMBDA)
                ppl, m, lam = min(score(m, lam) for m in TUNE_M)
            best[TUNED[label]] = (m, lam)
            print(f"[tune] {label}: M {m:g}, lambda {lam:g} (perplexity {ppl:.3f} on "
                  f"{Path(self.args.tune_text).name})", flush=True)
        return best

    def knobs(self, label: str, tuned: dict[str, tuple[float, float]]) -> tuple[float, float]:
        d = PruneSettings()
        return tuned.get(TUNED.get(label, ""), (d.outlier_m, d.lam))

    def sweep(self, tuned: dict[str, tuple[float, float]]) -> None:
        """The headline rows (unstructured with SparseGPT, the goal's pruner; structured; then
        unstructured with Wanda), then the other structured points (few rows), then the
        unstructured headline with the other seeds, then the other unstructured points."""
        seed, suites = self.args.seeds[0], self.args.suites

        def labels(suite: str, headline: bool = True) -> list[str]:
            mine = [lb for lb in METHODS if SUITE[lb] == suite and (headline or lb not in HEADLINE_ONLY)]
            return sorted(mine, key=lambda lb: "wanda" in lb)  # SparseGPT first (the goal's pruner)

        def other_points(suite: str) -> None:
            points = UNSTRUCTURED if suite == "unstructured" else STRUCTURED
            for sparsity in [p for p in points if p != HEADLINE[suite]]:
                for label in labels(suite, headline=False):
                    self.run("sweep", label, sparsity, seed, *self.knobs(label, tuned))

        first = [(s, lb) for s in suites for lb in labels(s)]
        for suite, label in sorted(first, key=lambda sl: "wanda" in sl[1]):
            self.run("sweep", label, HEADLINE[suite], seed, *self.knobs(label, tuned))
        if "structured" in suites:
            other_points("structured")
        if "unstructured" in suites:
            for s in self.args.seeds[1:]:
                for label in labels("unstructured"):
                    self.run("sweep", label, HEADLINE["unstructured"], s, *self.knobs(label, tuned))
            other_points("unstructured")

def tables(rows: list[dict], dense: dict) -> str:
    """Markdown: perplexity (top-1) per method and point; mean +- half-range over seeds."""
    out = [f"Dense: perplexity {float(dense['perplexity']):.3f}, top-1 {float(dense['top1']):.2%} "
           f"({dense['eval_tokens']} predicted tokens of {dense['eval_text']})"
           + (f"; {dense['eval_text_2']}: perplexity {float(dense['perplexity_2']):.3f}, top-1 "
              f"{float(dense['top1_2']):.2%}" if dense.get("perplexity_2") else "") + ".", ""]
    texts = [("", dense["eval_text"])] + ([("_2", dense["eval_text_2"])] if dense.get("perplexity_2") else [])
    for (suffix, text), (suite, points) in itertools.product(
            texts, (("unstructured", UNSTRUCTURED), ("structured", STRUCTURED))):
        sweep = [r for r in rows
                 if r["stage"] == "sweep" and r["suite"] == suite and r.get("perplexity" + suffix)]
        if not sweep:
            continue
        what = "sparsity" if suite == "unstructured" else "fewer decoder parameters"
        out += [f"**{suite.capitalize()}**: {text} perplexity (next-token top-1) by {what}",
                "", "| method | M | lambda | " + " | ".join(f"{p:.0%}" for p in points) + " |",
                "|---|---|---|" + "---|" * len(points)]
        for label in [lb for lb in METHODS if SUITE[lb] == suite]:
            mine = [r for r in sweep if r["label"] == label]
            if not mine:
                continue
            cells = []
            for p in points:
                at = [r for r in mine if math.isclose(float(r["sparsity"]), p)]
                if not at:
                    cells.append("")
                    continue
                ppl = [float(r["perplexity" + suffix]) for r in at]
                top1 = sum(float(r["top1" + suffix]) for r in at) / len(at)
                cell = f"{sum(ppl) / len(ppl):.2f}"
                if len(at) > 1:
                    cell += f" ± {(max(ppl) - min(ppl)) / 2:.2f} ({len(at)} seeds)"
                cells.append(f"{cell} ({top1:.1%})")
            out.append(f"| {label} | {mine[0]['outlier_m']} | {mine[0]['lam']} | " + " | ".join(cells) + " |")
        out.append("")
    tune = [r for r in rows if r["stage"] == "tune"]
    if tune:
        out += ["**Tuning** (perplexity on " + tune[0]["eval_text"] + ")", "",
                "| method | removed | M | lambda | perplexity |", "|---|---|---|---|---|"]
        out += [f"| {r['label']} | {float(r['sparsity']):.0%} | {r['outlier_m']} | {r['lam']} | "
                f"{r['perplexity']} |" for r in tune]
    return "\n".join(out) + "\n"


def _rule(label: str) -> str:
    """A line's colour key: an unstructured label's allocation rule (both pruners share it); a
    structured label is its own."""
    return METHODS[label]["allocation"] if SUITE[label] == "unstructured" else label


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, suite in zip(axes, ("unstructured", "structured"), strict=True):
        labels = [lb for lb in METHODS if SUITE[lb] == suite]
        # one colour per rule, the pruner by line style (12 unstructured lines, 10 default colours)
        rules = list(dict.fromkeys(_rule(lb) for lb in labels))
        for label in labels:
            mine = [r for r in rows if r["stage"] == "sweep" and r["label"] == label]
            if not mine:
                continue
            seed0 = int(mine[0]["seed"])
            xs = [float(r["removed"]) * 100 for r in mine if int(r["seed"]) == seed0]
            ys = [float(r["perplexity"]) for r in mine if int(r["seed"]) == seed0]
            xs, ys = zip(*sorted(zip(xs, ys, strict=True)), strict=True)
            ax.plot(xs, ys, marker="o", label=label, color=f"C{rules.index(_rule(label))}",
                    linestyle="--" if METHODS[label].get("method") == "sparsegpt" else "-")
        ax.axhline(float(dense["perplexity"]), color="gray", linewidth=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("removed decoder parameters (%)")
        ax.set_ylabel(f"perplexity ({dense['eval_text']})")
        ax.set_title(f"{suite}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib-text", default="builtin")
    p.add_argument("--calib-samples", type=int, default=CalibrationSettings.n_samples)
    p.add_argument("--seq-len", type=int, default=CalibrationSettings.seq_len)
    p.add_argument("--eval-text", default="builtin-heldout")
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--eval-text-2", default=None, help="a second text every swept model is scored "
                   "on (another domain), e.g. builtin-heldout")
    p.add_argument("--eval-windows-2", type=int, default=20)
    p.add_argument("--tune-text", default=None, help="text for tuning M and lambda (default: the "
                   "calibration text)")
    p.add_argument("--tune-windows", type=int, default=16)
    p.add_argument("--fixed-knobs", nargs="*", default=[], metavar="RULE=M,LAMBDA",
                   help="M and lambda of a rule tuned in an earlier run (rule: layer, projection, "
                        "joint, layer+type, error, composite or composite-error), used instead of "
                        "tuning it again")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--suites", nargs="+", default=["unstructured", "structured"],
                   choices=["unstructured", "structured"])
    p.add_argument("--stages", nargs="+", default=["timing", "tune", "sweep"],
                   choices=["timing", "tune", "sweep"])
    p.add_argument("--lm-eval-tasks", nargs="*", default=[],
                   help="lm-evaluation-harness tasks (names, or YAML files with local data) run on "
                        "every swept model; a task without offline data is skipped with its reason")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="examples per task")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/quality"))
    a = p.parse_args(argv)
    a.tune_text = a.tune_text or a.calib_text
    a.fixed_knobs = {k: tuple(float(x) for x in v.split(",")) for k, v in
                     (item.split("=", 1) for item in a.fixed_knobs)}
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(a)
    start = time.perf_counter()
    if "timing" in a.stages:
        bench.timing()
    dense = bench.dense_row()
    tuned = bench.tune() if "tune" in a.stages else {}
    if "sweep" in a.stages:
        bench.sweep(tuned)
    (a.out / "results.md").write_text(tables(bench.rows, dense))
    plot(bench.rows, dense, a.out / "quality.png")
    print(tables(bench.rows, dense))
    print(f"wrote {a.out}/results.csv, results.md, quality.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
