"""The joint search: the best predicted model for the budgets over storage type, structured
removal and recovery, with quantization alone (no pruning) as a candidate like any other.

1. For every type the target offers (its search_types; GGUF: F16 ... Q4_0; ONNX: fp32 ... int4),
   the budget search of search.py at that type's channel alignment: the least structured removal whose
   predicted cost meets every budget (0 when the dense model at that type already does).
2. Quality (quality.py): the dense model's probe perplexity at every type, in its runtime. The
   best dense type that meets the budgets sets the bar; a pruned candidate can only beat it at a
   type whose own quantization costs less than the bar, so the structural probe (pruned copies,
   PyTorch) runs only for those, at PROBE_LEVELS levels up to their removal, stopping early once a
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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mosaic_export.core.errors import Infeasible, UserError
from mosaic_export.core.texts import HELDOUT
from mosaic_export.decide.costmodel import Format, Pricing, anchored
from mosaic_export.decide.probing import (
    PROBE_LEVELS,
    TIE,
    competitive,
    dense_bar,
    probe_levels,
    probe_stop,
    recovery_levels,
)
from mosaic_export.decide.profile import Budgets
from mosaic_export.decide.quality import (
    PROBE_WINDOWS,
    ProbeRecovery,
    QualityModel,
    StructureProbe,
    log_error,
    measure_structure,
    measure_types,
    probe_evaluation,
    share_points,
    structure_points,
    write_probe,
)
from mosaic_export.decide.search import Candidate, SearchResult, make_pricing, search
from mosaic_export.measure.process import machine_label
from mosaic_export.measure.rounds import JOINT_POLICY, Policy
from mosaic_export.method.evaluate import perplexity
from mosaic_export.method.plan import PruneSettings
from mosaic_export.method.pod import LayerMeasurement
from mosaic_export.method.recover import RecoverSettings, recovery_state_dir
from mosaic_export.model.arch import ModelShape

if TYPE_CHECKING:
    import torch

    from mosaic_export.decide.profile import Profile
    from mosaic_export.method.evaluate import Perplexity
    from mosaic_export.model.folder import LoadedModel
    from mosaic_export.targets.base import Evaluation


class JointConfig(Protocol):
    """What the joint search reads of a run's configuration (run.config.RunConfig has it all)."""

    target: str
    types: tuple[str, ...]
    alignment: int | None
    margin: float
    recover: RecoverSettings | None
    out: Path | None
    device: str
    eval_text: str
    eval_windows: int | None
    threads: int | None
    rounds: Policy


# The dense model at each type, run elsewhere (a cluster): (probe text path, evaluation, log) -> runs.
RemoteRuns = Callable[[Path, "Evaluation", Callable], dict]



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


def joint_search(config: JointConfig, loaded: LoadedModel, measured, settings: PruneSettings,
                 profile: Profile, calib: torch.Tensor, log=print, remote: RemoteRuns | None = None,
                 ) -> JointResult:
    """The joint search run on a model: every type's budget search, the quality probe (quality.py:
    the dense model at each type in its runtime; pruned copies only where pruning could win),
    the choice. ``remote``: the dense types run elsewhere (run.cluster), handed in; None: here."""
    t0 = time.perf_counter()
    target = config.target
    pricings = {t: replace(make_pricing(profile, Format(target, t), loaded),
                           calibration=profile.calibration_near(Format(target, t)))
                for t in config.types}
    text, probe, reference, dense_runs = _dense_probe(config, loaded, next(iter(pricings.values())).context,
                                                      log, remote)
    type_deltas = {t: math.log(r["perplexity"]["perplexity"] / reference) for t, r in dense_runs.items()}
    dense_dims = [loaded.shape.dense_dims] * loaded.shape.n_layers
    for t, pricing in pricings.items():  # a type detect did not measure: anchored at its dense
        if profile.local and pricing.calibration.basis != "measured" and remote is None:  # run,
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


def _dense_probe(config: JointConfig, loaded: LoadedModel, context: int, log=print,
                 remote: RemoteRuns | None = None):
    """The probe windows (from the end of the evaluation text), the dense float32 model's
    perplexity on them, and the dense model exported at every type and run in its runtime."""
    text = config.eval_text if config.eval_windows != 0 else HELDOUT
    with tempfile.TemporaryDirectory(prefix="mosaic-probe-") as work:
        path, probe = write_probe(text, loaded.tokenizer, work)
        log(f"joint search over {', '.join(config.types)}: quality probe on {probe.shape[0]} windows "
            f"from the end of {text}")
        reference = perplexity(loaded.model, probe, text, desc="probe (dense)").perplexity
        evaluation = probe_evaluation(str(path), context, config.threads)
        if remote is not None:  # one task per type on the cluster, each result labelled with its machine
            dense_runs = remote(path, evaluation, log)
        else:
            policy = replace(JOINT_POLICY, max_seconds=config.rounds.max_seconds,
                             precision=config.rounds.precision)
            dense_runs = measure_types(loaded, config.target, list(config.types), work, evaluation, policy,
                                       log)
    return text, probe, reference, dense_runs


def _structural_probe(config: JointConfig, loaded: LoadedModel, spec: StructureProbe, searches: dict,
                      comp: dict, type_deltas: dict, reference: float,
                      log=print) -> tuple[tuple, tuple, list | None]:
    """Pruned (and, with config.recover, recovered) copies at the probe's levels, for the types
    where pruning could win (``comp``, from competitive): (the structure points, the recovered
    share points, the recovered measurements)."""
    if not spec.levels:
        log("structural probe skipped: no type that needs pruning (up to "
            f"{PROBE_LEVELS[-1]:.0%}) to meet the budgets can beat the best dense type that meets them")
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
