"""Budget-constrained search: the least pruning whose predicted cost meets every budget.

On the dense runtimes we export to (llama.cpp, ONNX Runtime), zeros inside a weight matrix are
stored and read like any other weight: only removed structure (heads, MLP channels) lowers memory
and latency. So the split is: the structured part is what the budgets need, found here; the
unstructured part is left at zero (it would only cost accuracy). The structured part is placed
by the POD allocation (planner.make_plan), at the target's channel alignment.

The removal target r (share of decoder parameters) is searched on a grid of STEP: a coarse scan,
then the first feasible step inside the bracket. The plan at r - NEIGHBOUR is reported with it,
to show what a little less pruning would miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from mosaic_export.core.errors import Infeasible, UserError
from mosaic_export.core.units import format_bytes
from mosaic_export.decide.costmodel import Cost, Format, Pricing
from mosaic_export.decide.profile import Budgets, Profile
from mosaic_export.method.plan import Plan, PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.method.pod import LayerMeasurement
from mosaic_export.model.arch import ModelShape
from mosaic_export.targets import names

STEP = 0.01
COARSE = 0.05
NEIGHBOUR = 0.05
MAX_TARGET = 0.8


@dataclass(frozen=True)
class BudgetCheck:
    name: str  # max_memory | min_tokens_per_s | max_ttft
    limit: float
    value: float
    met: bool

    def describe(self) -> str:
        return f"{LABELS[self.name]} {format_value(self.name, self.value)} (budget {OPS[self.name]} " \
               f"{format_value(self.name, self.limit)})"


LABELS = {"max_memory": "peak memory", "min_tokens_per_s": "decode", "max_ttft": "time to first token"}
OPS = {"max_memory": "<=", "min_tokens_per_s": ">=", "max_ttft": "<="}


def format_value(name: str, v: float) -> str:
    return {"max_memory": format_bytes(v), "min_tokens_per_s": f"{v:.1f} tokens/s",
            "max_ttft": f"{v * 1e3:.0f} ms"}[name]


def check_budgets(budgets: Budgets, memory_bytes: float, tokens_per_s: float,
                  ttft_s: float | None) -> list[BudgetCheck]:
    """Each budget that is set, against figures (predicted or measured)."""
    out = []
    if budgets.max_memory_bytes is not None:
        out.append(BudgetCheck("max_memory", budgets.max_memory_bytes, memory_bytes,
                               memory_bytes <= budgets.max_memory_bytes))
    if budgets.min_tokens_per_s is not None:
        out.append(BudgetCheck("min_tokens_per_s", budgets.min_tokens_per_s, tokens_per_s,
                               tokens_per_s >= budgets.min_tokens_per_s))
    if budgets.max_ttft_s is not None and ttft_s is not None:
        out.append(BudgetCheck("max_ttft", budgets.max_ttft_s, ttft_s, ttft_s <= budgets.max_ttft_s))
    return out


def cost_checks(budgets: Budgets, cost: Cost) -> list[BudgetCheck]:
    return check_budgets(budgets, cost.memory_bytes, cost.decode_tokens_per_s, cost.ttft_s)


@dataclass
class Candidate:
    target: float
    plan: Plan
    cost: Cost
    checks: list[BudgetCheck]  # against the budgets as given
    feasible: bool  # every budget met with the search's margin to spare

    def to_dict(self) -> dict:
        return {"removal_target": self.target, "removed": self.plan.removed(),
                "layers": [lp.dims.__dict__ for lp in self.plan.layers],
                "predicted": self.cost.to_dict(),
                "budgets": [c.__dict__ | {"text": c.describe()} for c in self.checks]}


@dataclass
class SearchResult:
    chosen: Candidate
    neighbour: Candidate | None  # NEIGHBOUR less pruning (None when the chosen plan is dense)
    dense: Candidate
    priced: list[Candidate]  # every plan the search priced, by removal target

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.to_dict(), "dense": self.dense.to_dict(),
                "neighbour": self.neighbour.to_dict() if self.neighbour else None,
                "plans_evaluated": len(self.priced), "step": STEP,
                "priced": [{"removal_target": c.target, "removed": c.plan.removed(),
                            "predicted": c.cost.to_dict(), "feasible": c.feasible}
                           for c in self.priced]}


def with_margin(budgets: Budgets, margin: float) -> Budgets:
    """Budgets tightened by ``margin`` (a fraction): the headroom kept for the cost model's
    error."""
    return replace(
        budgets,
        max_memory_bytes=None if budgets.max_memory_bytes is None
        else budgets.max_memory_bytes * (1 - margin),
        min_tokens_per_s=None if budgets.min_tokens_per_s is None
        else budgets.min_tokens_per_s * (1 + margin),
        max_ttft_s=None if budgets.max_ttft_s is None else budgets.max_ttft_s * (1 - margin))


def search(shape: ModelShape, source: str, measured: list[LayerMeasurement],
           settings: PruneSettings, budgets: Budgets, pricing: Pricing,
           margin: float = 0.0, plans: dict | None = None) -> SearchResult:
    """The least structured removal target (on the STEP grid) whose predicted cost meets every
    budget with ``margin`` to spare; when none does, a UserError naming each budget missed, the
    closest figure and what else would help. ``plans``: plans already made, by their
    settings (the target is the settings' sparsity), shared by searches at several types (a plan
    does not depend on the type)."""
    seen: dict[float, Candidate] = {}
    plans = {} if plans is None else plans
    tight = with_margin(budgets, margin)

    def at(target: float) -> Candidate:
        target = round(target, 4)
        if target not in seen:
            s = replace(settings, sparsity=target, structured_fraction=1.0 if target else 0.0)
            if s not in plans:
                plans[s] = make_plan(shape, source, measured, s)
            plan = plans[s]
            cost = pricing.cost([lp.dims for lp in plan.layers])
            fits = all(c.met for c in cost_checks(tight, cost))
            seen[target] = Candidate(target, plan, cost, cost_checks(budgets, cost), fits)
        return seen[target]

    dense = at(0.0)
    if not dense.checks:
        raise UserError("no budget to search for: give --max-memory, --min-tokens-per-s or "
                        "--max-ttft (or a profile with budgets), or an explicit --sparsity")
    if dense.feasible:
        return SearchResult(dense, None, dense, [dense])
    top = _largest_target(at)
    if not top.feasible:
        missed = [c for c in top.checks if not c.met] or top.checks
        headroom = f" (with a {margin:.0%} margin for the cost model's error)" if margin else ""
        raise Infeasible(f"no plan meets the budgets{headroom}: " + "; ".join(
            f"{LABELS[c.name]} budget {OPS[c.name]} {format_value(c.name, c.limit)} cannot be met: the "
            f"closest is {format_value(c.name, c.value)} with {top.target:.0%} of the decoder removed "
            f"({pricing.hint(c.name)})" for c in missed))
    lo, hi = 0.0, top.target  # lo infeasible, hi feasible
    t = COARSE
    while t < hi - 1e-9:
        if at(t).feasible:
            hi = t
            break
        lo = t
        t += COARSE
    t = lo + STEP
    while t < hi - 1e-9 and not at(t).feasible:
        t += STEP
    chosen = at(min(t, hi))
    neighbour = at(max(0.0, chosen.target - NEIGHBOUR))
    return SearchResult(chosen, neighbour, dense, [seen[t] for t in sorted(seen)])


def _largest_target(at: Callable[[float], Candidate]) -> Candidate:
    """The most pruning make_plan allows, up to MAX_TARGET (alignment can forbid more)."""
    t = MAX_TARGET
    while t > 0:
        try:
            return at(t)
        except UserError:
            t = round(t - COARSE, 4)
    raise Infeasible("this model cannot be pruned by structure at all with this alignment")


def search_summary(found: SearchResult) -> str:
    c = found.chosen
    if c.target == 0:
        return (f"the dense model already meets every budget (predicted: "
                f"{'; '.join(b.describe() for b in c.checks)}): no pruning")
    n = found.neighbour
    missed = [b.describe() for b in n.checks if not b.met] if n else []
    return (f"budget search ({len(found.priced)} plans priced): {c.target:.0%} of the decoder removed "
            f"by structure is the least that meets every budget (predicted: "
            f"{'; '.join(b.describe() for b in c.checks)})"
            + (f"; at {n.target:.0%} it would miss: {'; '.join(missed)}" if n else ""))


def cost_section(profile: Profile, pricing: Pricing, plan: Plan, found: SearchResult | None,
                 margin: float = 0.0) -> dict:
    """Predicted figures, each budget against them (what was measured: verdict.measured_section)."""
    cost = pricing.cost([lp.dims for lp in plan.layers])
    b = profile.budgets
    section = {"format": pricing.fmt.key, "basis": cost.basis, "profile_local": profile.local,
               "removed": plan.removed(),
               "calibration": pricing.calibration.to_dict(), "predicted": cost.to_dict(),
               "predicted_budgets": [c.__dict__ for c in cost_checks(b, cost)],
               "search": found.to_dict() if found else None, "margin": margin}
    return section


def resolve_budgets(profile: Profile, pricing: Pricing | None, log=None) -> Profile:
    """Relative budgets ("0.9x") as absolute ones: the factor times the dense model's predicted
    figure in the target's format on the profile."""
    relative = profile.budgets.relative
    if not relative:
        return profile
    if pricing is None:
        raise UserError("relative budgets (such as 0.9x) are relative to the dense model in a "
                        f"runtime format: give a target (--target {' or '.join(names())})")
    dense = pricing.cost([pricing.shape.dense_dims] * pricing.shape.n_layers)
    resolved = profile.resolve_relative(dense.memory_bytes, dense.decode_tokens_per_s, dense.ttft_s)
    if log is not None:
        b = resolved.budgets
        absolute = {"max_memory": format_bytes(b.max_memory_bytes or 0),
                    "min_tokens_per_s": f"{b.min_tokens_per_s or 0:.1f} tokens/s",
                    "max_ttft": f"{(b.max_ttft_s or 0) * 1e3:.0f} ms"}
        log(f"budgets relative to the dense model ({pricing.fmt.key}, {dense.basis} prediction): "
            + "; ".join(f"{name} {factor:g}x = {absolute[name]}" for name, factor in relative.items()))
    return resolved


def make_pricing(profile: Profile, fmt: Format, loaded, strict: bool = True) -> Pricing:
    """The cost model for this model in the format on the profile's device (GGUF: the types
    llama.cpp's quantizer will choose, read from a stand-in file). A budget context longer than
    the model's is an error when budgets drive the run (``strict``), else priced at the model's."""
    fmt.spec.check_exportable(loaded)
    context = profile.budgets.context
    longest = getattr(loaded.model.config, "max_position_embeddings", None) or context
    if context > longest and strict:
        raise UserError(f"a context of {context} tokens is longer than the model's maximum of "
                        f"{longest}")
    types = fmt.spec.tensor_types(loaded, fmt.name)
    return Pricing(loaded.shape, fmt, profile.calibration_for(fmt), min(context, longest), types)
