"""The joint search: the best predicted model for the budgets over storage type, structured
removal and recovery, with quantization alone (no pruning) as a candidate like any other.

1. For every type the target offers (its search_types; GGUF: F16 ... Q4_0; ONNX: fp32 ... int4),
   the budget search of search.py at that type's channel alignment: the least structured removal whose
   predicted cost meets every budget (0 when the dense model at that type already does).
2. Quality (quality.py): the dense model's probe perplexity at every type, in its runtime. The
   best dense type that meets the budgets sets the bar; a pruned candidate can only beat it at a
   type whose own quantization costs less than the bar, so the structural probe (pruned copies,
   PyTorch) runs only for those, at LADDER levels up to their removal, stopping early once a
   measured level rules out the types that need more (probe_stop), and recovery (when asked)
   once, at the level nearest their median removal (nothing is ruled out before it).
3. Choice: among candidates whose predicted cost meets every budget, the lowest predicted
   log-perplexity; within TIE of it, the fastest predicted decode. Removing more structure at a
   type is assumed never to help, so at each type only its least feasible removal can win.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

from .arch import ModelShape
from .costmodel import Pricing
from .errors import Infeasible, UserError
from .plan import PruneSettings
from .pod import LayerMeasurement
from .profile import Budgets
from .quality import OVERSHOOT, QualityModel, StructureProbe, log_error, share_points
from .search import Candidate, SearchResult, make_pricing, search

if TYPE_CHECKING:
    import torch

    from .evaluate import Perplexity
    from .model_io import LoadedModel
    from .pipeline import RunConfig
    from .profile import Profile

# Removal levels the structural probe may measure. A type that needs more than the last to fit
# is not predicted (its candidates cannot be chosen): at 60% removed a model has lost most of
# its quality, and probing further would cost more than it could tell.
LADDER = (0.15, 0.30, 0.45, 0.60)
TIE = 1e-3  # predicted log-perplexities this close are a tie, broken by decode speed


@dataclass
class Option:
    """One candidate: a type, a plan at that type's alignment, with or without recovery."""

    type: str
    candidate: Candidate  # the plan, its predicted cost and the budget checks (search.py)
    recovered: bool = False
    delta: float | None = None  # predicted log-perplexity change against dense float32

    @cached_property
    def removed(self) -> float:
        return self.candidate.plan.removed()

    @property
    def feasible(self) -> bool:
        return self.candidate.feasible

    def label(self) -> str:
        if self.removed < 1e-9:
            return f"dense {self.type}"
        return f"{self.type}, {self.removed:.1%} removed{', recovered' if self.recovered else ''}"

    def to_dict(self, reference: float | None = None) -> dict:
        c = self.candidate.cost
        return {"type": self.type, "removal_target": self.candidate.target, "removed": self.removed,
                "recovered": self.recovered, "feasible": self.feasible, "delta": self.delta,
                "predicted_perplexity": None if self.delta is None or reference is None
                else reference * math.exp(self.delta),
                "predicted": {"weight_bytes": c.weight_bytes, "memory_bytes": c.memory_bytes,
                              "decode_tokens_per_s": c.decode_tokens_per_s,
                              "prefill_tokens_per_s": c.prefill_tokens_per_s, "ttft_s": c.ttft_s,
                              "basis": c.basis}}


@dataclass
class JointResult:
    chosen: Option
    options: list[Option]  # every candidate priced, every type, with and without recovery
    searches: dict[str, SearchResult | str]  # type -> its budget search, or why none meets the budgets
    quality: QualityModel
    reason: str  # why the chosen candidate, in one sentence
    pricings: dict[str, Pricing] = field(default_factory=dict)
    seconds: float = 0.0  # the whole joint search: every type's runtime run and the probes

    @property
    def search(self) -> SearchResult:
        """The budget search at the chosen type (what the cost section reports)."""
        return self.searches[self.chosen.type]

    def to_dict(self) -> dict:
        ref = self.quality.reference
        return {"chosen": self.chosen.to_dict(ref), "reason": self.reason,
                "quality": self.quality.to_dict(),
                "infeasible_types": {t: s for t, s in self.searches.items() if isinstance(s, str)},
                "options": [o.to_dict(ref) for o in self.options]}


def type_searches(shape: ModelShape, source: str, measured: list[LayerMeasurement],
                  settings: PruneSettings, budgets: Budgets, pricings: dict[str, Pricing],
                  alignments: dict[str, int], margin: float) -> dict[str, SearchResult | str]:
    """The budget search at every type, each at its own alignment; the error's text for a type
    at which no plan meets the budgets."""
    out: dict[str, SearchResult | str] = {}
    plans: dict = {}  # types at one alignment share their plans
    for t, pricing in pricings.items():
        try:
            out[t] = search(shape, source, measured, replace(settings, alignment=alignments[t]),
                            budgets, pricing, margin, plans)
        except Infeasible as e:
            out[t] = str(e)
    return out


def dense_bar(searches: dict[str, SearchResult | str], type_deltas: dict[str, float]) -> float:
    """The predicted change of the best type that meets the budgets without pruning (infinite when
    none does): what a pruned candidate has to beat."""
    return min((type_deltas[t] for t, s in searches.items()
                if isinstance(s, SearchResult) and s.chosen.target == 0), default=math.inf)


def competitive(searches: dict[str, SearchResult | str], type_deltas: dict[str, float]) -> dict[str, float]:
    """Types whose least feasible removal is above 0 (and within LADDER) and whose quantization
    alone costs less than the best dense type that meets the budgets: {type: removed share}.
    Only these need the structural probe."""
    bar = dense_bar(searches, type_deltas)
    out = {}
    for t, s in searches.items():
        if isinstance(s, SearchResult) and s.chosen.target > 0 and type_deltas[t] < bar:
            removed = s.chosen.plan.removed()
            if removed <= LADDER[-1] + 1e-9:
                out[t] = removed
    return out


def probe_levels(removals: list[float], ladder: tuple[float, ...] = LADDER) -> list[float]:
    """LADDER levels up to the first at or above the largest removal: enough to interpolate every
    competitive candidate."""
    if not removals:
        return []
    top = max(removals)
    levels = []
    for level in ladder:
        levels.append(level)
        if level >= top - 1e-9:
            break
    return levels


def ruled_out(comp: dict[str, float], type_deltas: dict[str, float], bar: float, removed: float,
              change: float, share: float | None) -> set[str]:
    """Competitive types a measured level already rules out, so the probe can stop short of them:
    each needs more removal than ``removed``, and removing more is assumed never to help, so its
    best candidate is predicted at least its type change + ``change`` x (1 - ``share``), and that
    is not within TIE of ``bar``. ``share``: recovery's share, 0 without recovery, None while it is
    not yet measured (then a recovered candidate has no bound, and nothing is ruled out)."""
    if share is None:
        return set()
    return {t for t, r in comp.items()
            if r > removed + 1e-9 and type_deltas[t] + change * (1 - share) > bar + TIE}


def probe_stop(comp: dict[str, float], type_deltas: dict[str, float], bar: float, reference: float,
               recoveries: int, log=print):
    """quality.measure_structure's ``stop``: true once no competitive type needs a removal past
    what the levels measured so far predict (the last one's removal + OVERSHOOT), except those
    the levels measured rule out (ruled_out). ``recoveries``: how many levels recovery is
    measured at; until all are, nothing is ruled out, then the largest share bounds."""

    def stop(rows: list[tuple[float, float, float]], recovered: list[tuple[float, float]]) -> bool:
        level, removed, ppl = rows[-1]
        share = 0.0 if not recoveries else None
        if recoveries and len(recovered) >= recoveries:
            share = max(s for _, s in share_points(reference, rows, recovered))
        out = ruled_out(comp, type_deltas, bar, removed, math.log(ppl / reference), share)
        if any(r > removed + OVERSHOOT for t, r in comp.items() if t not in out):
            return False
        if any(r > removed + OVERSHOOT for r in comp.values()):
            log(f"structural probe stopped at {level:.0%}: {', '.join(sorted(out))} would need more "
                f"removal and cannot beat the best dense type that meets the budgets")
        return True

    return stop


def recovery_levels(levels: list[float], removals: list[float]) -> tuple[float, ...]:
    """The probe levels nearest the least and the largest competitive removal (one when they
    coincide): where recovery's share is measured, so that the candidates in between are
    interpolated, not carried from a level far off."""
    if not levels or not removals:
        return ()
    nearest = [min(levels, key=lambda lv: (abs(lv - r), lv)) for r in (min(removals), max(removals))]
    return tuple(sorted(set(nearest)))


def options(searches: dict[str, SearchResult | str], quality: QualityModel,
            recover: bool) -> list[Option]:
    """Every distinct plan each type's search priced (removal targets a step apart can round to
    the same channels at a coarse alignment) as a candidate, with its predicted quality; with
    ``recover``, each pruned plan also as recovered."""
    out = []
    for t, s in searches.items():
        if isinstance(s, str):
            continue
        seen = set()
        for c in s.priced:
            dims = tuple(lp.dims for lp in c.plan.layers)
            if dims in seen:
                continue
            seen.add(dims)
            o = Option(t, c)
            o.delta = quality.delta(t, o.removed)
            out.append(o)
            if recover and o.removed > 1e-9:
                r = Option(t, c, recovered=True)
                r.delta = quality.delta(t, o.removed, recovered=True)
                out.append(r)
    return out


def choose(opts: list[Option], quality: QualityModel | None = None) -> tuple[Option, str]:
    """The feasible option with the lowest predicted log-perplexity (within TIE: the fastest
    predicted decode), and why, in one sentence (``quality``: to say what ruled out the pruned
    candidates the probe did not reach)."""
    ok = [o for o in opts if o.feasible and o.delta is not None]
    if not ok:
        raise UserError("no candidate (type x structured removal) meets the budgets with a predicted "
                        "quality")
    best = min(o.delta for o in ok)
    chosen = max((o for o in ok if o.delta <= best + TIE),
                 key=lambda o: (o.candidate.cost.decode_tokens_per_s, -o.removed))
    pruned = [o for o in ok if o.removed > 1e-9]
    dense = [o for o in ok if o.removed <= 1e-9]
    if chosen.removed <= 1e-9:
        if pruned:
            rival = min(pruned, key=lambda o: o.delta)
            why = (f"{chosen.label()} meets every budget without pruning and is predicted better "
                   f"than every pruned candidate that does (the best, {rival.label()}, is predicted "
                   f"{math.exp(rival.delta - chosen.delta) - 1:+.1%} perplexity)")
        else:
            why = f"{chosen.label()} meets every budget without pruning, and is the best type that does"
        beyond = sorted({o.type for o in opts if o.feasible and o.removed > 1e-9}
                        - {o.type for o in pruned})
        if beyond and quality is not None and quality.structure:
            level, change = quality.structure[-1]
            why += (f"; {', '.join(beyond)} would fit only with more removal than the structural "
                    f"probe reached: {level:.0%} removed already costs {math.exp(change) - 1:+.0%} "
                    f"perplexity")
    elif dense:
        rival = min(dense, key=lambda o: o.delta)
        why = (f"{chosen.label()} is predicted {math.exp(chosen.delta - rival.delta) - 1:+.1%} "
               f"perplexity against the best dense type that meets the budgets, {rival.label()}")
    else:
        why = f"no dense type meets the budgets; {chosen.label()} is the best predicted candidate that does"
    return chosen, why


def infeasible_message(searches: dict[str, SearchResult | str]) -> str:
    return "no type meets the budgets: " + "; ".join(f"{t}: {s}" for t, s in searches.items())


def joint_search(config: RunConfig, loaded: LoadedModel, measured, settings: PruneSettings,
                 profile: Profile, calib: torch.Tensor, log=print) -> JointResult:
    """The joint search run on a model: every type's budget search, the quality probe (quality.py:
    the dense model at each type in its runtime; pruned copies only where pruning could win),
    the choice."""
    from .costmodel import Format, anchored
    from .process import machine_label
    from .quality import PROBE_WINDOWS

    t0 = time.perf_counter()
    target = config.target
    pricings = {t: replace(make_pricing(profile, Format(target, t), loaded),
                           calibration=profile.calibration_near(Format(target, t)))
                for t in config.types}
    text, probe, reference, dense_runs = _dense_probe(config, loaded, next(iter(pricings.values())).context,
                                                      log)
    type_deltas = {t: math.log(r["perplexity"]["perplexity"] / reference) for t, r in dense_runs.items()}
    dense_dims = [loaded.shape.dense_dims] * loaded.shape.n_layers
    for t, pricing in pricings.items():  # a type detect did not measure: anchored at its dense
        if profile.local and pricing.calibration.basis != "measured" and not config.ray:  # run,
            pricings[t] = replace(pricing, calibration=anchored(pricing, dense_dims, dense_runs[t]))
            # when made here as a build is (a cluster's run has its own threads and neighbours)
    here = machine_label()
    alignments = {t: config.alignment or Format(target, t).spec.alignment(t) for t in config.types}
    searches = type_searches(loaded.shape, loaded.source, measured, settings, profile.budgets,
                             pricings, alignments, config.margin)
    if all(isinstance(s, str) for s in searches.values()):
        raise UserError(infeasible_message(searches))
    comp = competitive(searches, type_deltas)
    levels = probe_levels(list(comp.values()))
    align = min((alignments[t] for t in comp), default=None)
    structure, share, recovered = _structural_probe(
        config, loaded, StructureProbe(measured, replace(settings, alignment=align), tuple(levels), calib,
                                       probe), searches, comp, type_deltas, reference, log)
    quality = QualityModel(reference, type_deltas, structure, share, probe={
        "text": text, "windows": PROBE_WINDOWS, "from": "the end of the text", "dense_runs": {
            t: {"perplexity": r["perplexity"]["perplexity"], "file_bytes": r["file_bytes"],
                "peak_rss_bytes": r["peak_rss_bytes"], "decode_tokens_per_s": r["decode"]["tokens_per_s"],
                "prefill_tokens_per_s": r["prefill"]["tokens_per_s"],
                "rounds": (r.get("measured") or {}).get("rounds", 1),
                "rounds_seconds": (r.get("measured") or {}).get("seconds"),
                "machine": r.get("machine", here)} for t, r in dense_runs.items()},
        "structure_alignment": align, "structure_levels_planned": levels,
        "recovered": [list(r) for r in recovered] if recovered else None})
    opts = options(searches, quality, config.recover is not None)
    chosen, why = choose(opts, quality)
    log(f"joint search: {chosen.label()}: {why}")
    return JointResult(chosen, opts, searches, quality, why, pricings, time.perf_counter() - t0)


def _dense_probe(config: RunConfig, loaded: LoadedModel, context: int, log=print):
    """The probe windows (from the end of the evaluation text), the dense float32 model's
    perplexity on them, and the dense model exported at every type and run in its runtime."""
    from .evaluate import perplexity
    from .measure.rounds import JOINT_POLICY
    from .quality import measure_types, probe_evaluation, write_probe
    from .texts import HELDOUT

    text = config.eval_text if config.eval_windows != 0 else HELDOUT
    with tempfile.TemporaryDirectory(prefix="mosaic-probe-") as work:
        path, probe = write_probe(text, loaded.tokenizer, work)
        log(f"joint search over {', '.join(config.types)}: quality probe on {probe.shape[0]} windows "
            f"from the end of {text}")
        reference = perplexity(loaded.model, probe, text, desc="probe (dense)").perplexity
        evaluation = probe_evaluation(str(path), context, config.threads)
        if config.ray:  # one task per type on the cluster, each result labelled with its machine
            from . import cluster

            params = sum(p.numel() for p in loaded.model.parameters())
            dense_runs = cluster.measure_types(config, params, path, evaluation, log)
        else:
            policy = replace(JOINT_POLICY, max_seconds=config.rounds.max_seconds,
                             precision=config.rounds.precision)
            dense_runs = measure_types(loaded, config.target, list(config.types), work, evaluation, policy,
                                       log)
    return text, probe, reference, dense_runs


def _structural_probe(config: RunConfig, loaded: LoadedModel, spec: StructureProbe, searches: dict,
                      comp: dict, type_deltas: dict, reference: float,
                      log=print) -> tuple[tuple, tuple, list | None]:
    """Pruned (and, with config.recover, recovered) copies at the probe's levels, for the types
    where pruning could win (``comp``, from competitive): (the structure points, the recovered
    share points, the recovered measurements)."""
    from .quality import ProbeRecovery, measure_structure, structure_points
    from .recover import recovery_state_dir

    if not spec.levels:
        log("structural probe skipped: no type that needs pruning (up to "
            f"{LADDER[-1]:.0%}) to meet the budgets can beat the best dense type that meets them")
        return (), (), None
    levels = list(spec.levels)
    recover_at = recovery_levels(levels, list(comp.values())) if config.recover else ()
    log(f"structural probe at {', '.join(f'{lv:.0%}' for lv in levels)} (alignment "
        f"{spec.settings.alignment}; it stops once the levels measured rule out the types that need more)")
    stop = probe_stop(comp, type_deltas, dense_bar(searches, type_deltas), reference, len(recover_at), log)
    recovery = ProbeRecovery(config.recover, tuple(recover_at),
                             recovery_state_dir(config.out) if config.out else None,
                             config.device) if config.recover else None
    probed = measure_structure(loaded, spec, recovery, log, stop=stop)
    structure = structure_points(reference, [(r, p) for _, r, p in probed["levels"]])
    recovered = probed["recovered"]
    share = share_points(reference, probed["levels"], recovered) if recovered else ()
    return structure, share, recovered


def joint_check(joint: JointResult, runtime: dict | None, dense: Perplexity | None) -> dict | None:
    """The chosen candidate's predicted perplexity on the evaluation text (the dense float32
    figure there, moved by the predicted change) against the runtime's measured one."""
    measured = ((runtime or {}).get("benchmark") or {}).get("perplexity")
    if not measured or dense is None or joint.chosen.delta is None:
        return None
    predicted = dense.perplexity * math.exp(joint.chosen.delta)
    return {"text": measured["text"], "predicted_perplexity": predicted,
            "measured_perplexity": measured["perplexity"],
            "log_error": log_error(predicted, measured["perplexity"])}
