"""Predicted quality: how much a storage type and a structured removal raise perplexity.

    log ppl(type, removed, recovered) = log ppl(dense, PyTorch float32)
                                        + type_delta[type]
                                        + structure(removed) x (1 - recovered_share if recovered)

All three terms are measured on the same probe: PROBE_WINDOWS windows from the end of the
evaluation text (write_probe says why not the calibration text).
- type_delta: the runtime's own perplexity of the dense model exported at that type (llama.cpp
  for GGUF, ONNX Runtime for ONNX), less PyTorch's float32 perplexity, in log terms.
- structure(r): PyTorch perplexity of the model pruned by structure alone (after compensation) at a
  few removal levels (the share of decoder parameters removed), less the dense model's; linear in
  log-perplexity between levels, (0, 0) included, never extrapolated past the last level.
- recovered_share: the share of structure(r) that recovery (distillation) closes, measured at
  one or two levels: linear in the removal between two, the nearest one's outside them (recovery
  closes less of a deeper cut: 42% at 30% removed, 30% at 45% on SmolLM2-135M).

The sum assumes the quantization error and the structural error independent (additive in
log-perplexity). That is a model, not a fact: its error against measured points is reported
(BENCHMARKS.md, "The best model for the budget").
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field

from mosaic_export.core.texts import corpus
from mosaic_export.decide.benchmarks import export_format, measure, median_run
from mosaic_export.decide.costmodel import Format
from mosaic_export.measure.rounds import JOINT_POLICY
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.passes import apply_to_model
from mosaic_export.method.planner import make_plan
from mosaic_export.method.recover import distill, training_windows
from mosaic_export.targets.base import Evaluation

PROBE_WINDOWS = 8  # probe windows of PROBE_SEQ_LEN tokens: seconds per type for a small model
PROBE_SEQ_LEN = 512
OVERSHOOT = 0.01  # removal share past the last probed level still predicted (by its slope)


@dataclass(frozen=True)
class QualityModel:
    """The measured terms of the prediction (log-perplexity changes against dense float32)."""

    reference: float  # the dense model's perplexity in PyTorch, float32, on the probe
    type_deltas: dict[str, float]  # type -> log ppl(runtime, dense at type) - log reference
    structure: tuple[tuple[float, float], ...] = ()  # (removed share, log ppl change), increasing
    # share of the structural change recovery closes, measured: (removed share, share) points,
    # increasing; one point stands for every removal; none: recovery not measured
    recovered_share: tuple[tuple[float, float], ...] = ()
    probe: dict = field(default_factory=dict)  # text, windows, what was measured where

    def structural(self, removed: float) -> float | None:
        """The log-perplexity change of removing ``removed`` of the decoder by structure:
        interpolated between measured levels, continued along the last segment up to OVERSHOOT
        past the last level (a plan at a coarser alignment lands a little off the probed one);
        None further out (not predicted)."""
        if removed <= 1e-9:
            return 0.0
        points = [(0.0, 0.0), *self.structure]
        xs = [x for x, _ in points]
        if len(xs) == 1 or removed > xs[-1] + OVERSHOOT:
            return None
        i = min(bisect.bisect_left(xs, removed), len(xs) - 1)
        if i < len(xs) and abs(xs[i] - removed) <= 1e-9:
            return points[i][1]
        (x0, y0), (x1, y1) = points[i - 1], points[i]
        return y0 + (y1 - y0) * (removed - x0) / (x1 - x0)

    def delta(self, type_: str, removed: float, recovered: bool = False) -> float | None:
        """Predicted log-perplexity change against dense float32; None when not predictable
        (the type not measured, the removal past the probed levels, recovery not measured)."""
        s = self.structural(removed)
        if type_ not in self.type_deltas or s is None:
            return None
        if recovered and removed > 1e-9:
            share = self.share(removed)
            if share is None:
                return None
            s *= 1 - share
        return self.type_deltas[type_] + s

    def share(self, removed: float) -> float | None:
        """Recovery's share at ``removed``: interpolated between measured points, the nearest
        point's outside them; None when recovery was not measured."""
        points = self.recovered_share
        if not points:
            return None
        xs = [x for x, _ in points]
        if removed <= xs[0]:
            return points[0][1]
        if removed >= xs[-1]:
            return points[-1][1]
        i = bisect.bisect_right(xs, removed)
        (x0, y0), (x1, y1) = points[i - 1], points[i]
        return y0 + (y1 - y0) * (removed - x0) / (x1 - x0)

    def perplexity(self, type_: str, removed: float, recovered: bool = False,
                   dense: float | None = None) -> float | None:
        """Predicted perplexity, anchored at ``dense`` (the dense float32 perplexity on another
        text, e.g. the evaluation text) or at the probe's."""
        d = self.delta(type_, removed, recovered)
        return None if d is None else (dense if dense is not None else self.reference) * math.exp(d)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["structure"] = [list(p) for p in self.structure]
        out["recovered_share"] = [list(p) for p in self.recovered_share] or None
        return out


def structure_points(reference: float, measured: list[tuple[float, float]]) -> tuple:
    """(removed share, log change) pairs from (removed share, perplexity) measurements, sorted;
    a later level measured better than an earlier one is kept as measured (noise is shown, not
    smoothed)."""
    return tuple(sorted((r, math.log(p / reference)) for r, p in measured))


def recovered_share(reference: float, pruned: float, recovered: float) -> float:
    """The share of the pruned model's log-perplexity gap to dense that recovery closed."""
    gap = math.log(pruned / reference)
    if gap <= 0:
        return 0.0
    return max(0.0, min(1.0, 1 - math.log(recovered / reference) / gap))


def share_points(reference: float, levels: list[tuple[float, float, float]],
                 recovered: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """(removed share, recovered share) points, increasing, from measure_structure's rows:
    levels [(target, removed, perplexity)], recovered [(removed, perplexity)]."""
    pruned = {r: p for _, r, p in levels}
    return tuple(sorted((r, recovered_share(reference, pruned[r], p)) for r, p in recovered))


def log_error(predicted: float, measured: float) -> float:
    """|log predicted - log measured|: 0.1 is about 10% off."""
    return abs(math.log(predicted / measured))


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    if not n:
        raise ValueError("median of nothing")
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


# --- measuring the terms -------------------------------------------------------------------------


def write_probe(eval_text: str, tokenizer, folder) -> tuple:
    """The probe: a file in ``folder`` holding the tail of the evaluation text (from a line
    start, PROBE_WINDOWS windows of PROBE_SEQ_LEN tokens and a margin), and its windows as PyTorch
    scores them (the runners read the same file and cut the same windows).

    Not the calibration text: compensation is fitted on the calibration windows, so scoring
    there flatters pruning. The tail, not the head: the report evaluates the first windows of the
    same text, so on a long text (WikiText-2 test) the probe and the evaluation are disjoint; on a
    short one (the built-in held-out text) they overlap."""
    from pathlib import Path

    text = corpus(eval_text)
    need = PROBE_WINDOWS * PROBE_SEQ_LEN
    total = tokenize(tokenizer, text).numel()
    start = int(len(text) * max(0.0, 1 - 1.1 * need / total))
    start = text.find("\n", start) + 1 if start else 0
    if tokenize(tokenizer, text[start:]).numel() < need:
        start = 0
    path = Path(folder) / "probe.txt"
    path.write_text(text[start:], encoding="utf-8")
    ids = windows(tokenize(tokenizer, corpus(str(path))), PROBE_SEQ_LEN, PROBE_WINDOWS, str(path))
    return path, ids


def probe_evaluation(text: str, context: int, threads: int | None = None,
                     n_windows: int = PROBE_WINDOWS):
    """How measure_types runs each type: the probe text's windows at PROBE_SEQ_LEN, the context full."""

    return Evaluation(text, n_windows, PROBE_SEQ_LEN, context, threads)


def measure_types(loaded, target: str, types: list[str], work, evaluation, policy=None, log=print) -> dict:
    """The dense model exported at each type and run in its runtime, the types in interleaved
    rounds (benchmarks.measure; the first round also scores the probe): {type: its first run, with
    speed and memory as medians over the rounds (benchmarks.median_run)}; speed and memory are
    measured with the context full, as for any built model. ``evaluation``: the probe's text and
    windows (probe_evaluation), the context and threads (targets.base.Evaluation); ``policy``: the
    rounds' (measure.rounds.JOINT_POLICY by default: the first round, then more while the time cap
    allows)."""
    from pathlib import Path

    files = {t: (Format(target, t), export_format(loaded, Format(target, t), Path(work) / f"dense-{t}"))
             for t in types}
    m = measure(files, policy or JOINT_POLICY, evaluation.context, evaluation.threads, first=evaluation,
                log=log)
    out = {t: median_run(m, t) for t in types}
    for t, r in out.items():
        log(f"  dense {t}: probe perplexity {r['perplexity']['perplexity']:.3f}, "
            f"{r['file_bytes'] / 2**20:.1f} MiB, decode {m.figure(t, 'decode').text(lambda v: f'{v:.1f}')} "
            "tokens/s")
    return out


@dataclass(frozen=True)
class StructureProbe:
    """What the structural probe prunes and scores: the pass-1 measurements, the settings (their
    alignment), the removal levels, the calibration windows and the probe windows."""

    measured: list
    settings: object  # PruneSettings
    levels: tuple[float, ...]
    calib: object  # torch.Tensor (n_samples, seq_len)
    probe: object  # torch.Tensor (n_windows, seq_len)


@dataclass(frozen=True)
class ProbeRecovery:
    """Which of the probe's pruned copies are also distilled from the dense model, and how."""

    settings: object  # RecoverSettings
    levels: tuple[float, ...]
    cache_dir: object = None  # Path: where the training text is cached
    device: str | None = "cpu"
    train_ids: object = None  # torch.Tensor: the training windows, when the caller has them

    def covers(self, level: float) -> bool:
        return any(abs(level - at) < 1e-9 for at in self.levels)


def measure_structure(loaded, spec: StructureProbe, recovery: ProbeRecovery | None = None, log=print,
                      visit=None, stop=None) -> dict:
    """Perplexity on the probe of copies of the dense model pruned by structure alone at each
    level (a plan made from the pass-1 measurements, applied with compensation); with
    ``recovery``, the copies at its levels are also distilled from the dense model.
    ``visit(student, row)``, when given, sees each copy as measured (pruned, then recovered), with
    row = {"level", "removed", "recovered", "perplexity", "seconds"}; ``stop(levels, recovered)``,
    when given, is asked after each level (and its recovery) whether to stop there (True ends the
    probe). Returns {"levels": [(target, removed, perplexity)], "recovered": [(removed, perplexity)]}."""
    import copy
    import time
    from dataclasses import replace

    rows, recovered = [], []
    for level in spec.levels:
        plan = make_plan(loaded.shape, loaded.source, spec.measured,
                         replace(spec.settings, sparsity=level, structured_fraction=1.0))
        removed = plan.removed()
        student = copy.deepcopy(loaded)
        t0 = time.perf_counter()
        apply_to_model(student, plan, spec.calib, batch_size=4)
        seconds = time.perf_counter() - t0
        ppl = perplexity(student.model, spec.probe, "probe", desc=f"probe ({removed:.0%} removed)").perplexity
        log(f"  {removed:.1%} removed by structure: probe perplexity {ppl:.3f}")
        rows.append((level, removed, ppl))
        if visit is not None:
            visit(student, {"level": level, "removed": removed, "recovered": False,
                            "perplexity": ppl, "seconds": seconds})
        if recovery is not None and recovery.covers(level):
            recovery, rppl, seconds = _recover_copy(student, loaded, spec.probe, recovery, log)
            log(f"  {removed:.1%} removed, recovered: probe perplexity {rppl:.3f}")
            recovered.append((removed, rppl))
            if visit is not None:
                visit(student, {"level": level, "removed": removed, "recovered": True,
                                "perplexity": rppl, "seconds": seconds})
        del student
        if stop is not None and stop(rows, recovered):
            break
    return {"levels": rows, "recovered": recovered}


def _recover_copy(student, loaded, probe, recovery: ProbeRecovery,
                  log) -> tuple[ProbeRecovery, float, float]:
    """Distil the pruned copy from the dense model and score it on the probe: the recovery with
    its training windows (read or written once, on the first recovery), the perplexity, the
    seconds of training."""
    from dataclasses import replace

    if recovery.train_ids is None:
        ids, _ = training_windows(recovery.settings, loaded, recovery.cache_dir, log, recovery.device)
        recovery = replace(recovery, train_ids=ids)
    result = distill(student.model, loaded.model, recovery.train_ids, recovery.settings,
                     device=recovery.device)
    log(f"  recovered in {result.seconds:.0f} s")
    rppl = perplexity(student.model, probe, "probe", desc="probe (recovered)").perplexity
    return recovery, rppl, result.seconds
