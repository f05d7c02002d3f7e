"""The verdict on each budget: met, missed or undecided, from figures measured in rounds.

A budget is judged against the interval of the measured figure (measure/stats.judge): met when
the whole interval is on the budget's side, missed when the whole interval is beyond it,
undecided when the interval straddles it. A relative budget ("1.1x") is judged on the ratio of
the built model's figure to the dense model's, both measured in the same rounds (so noise common
to both cancels), never against a figure from earlier: "1.1x" means 1.1 times the dense model
measured beside the plan.

The main command exits with MISSED_EXIT when a budget is missed beyond its interval (the output
folder is written all the same), 0 when every budget is met or undecided.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from mosaic_export.decide.profile import Budgets
from mosaic_export.decide.search import LABELS, OPS, format_value
from mosaic_export.measure.rounds import Measurement
from mosaic_export.measure.stats import MET, MISSED, UNDECIDED, Interval, judge

MISSED_EXIT = 3  # the exit status of a run that missed a budget beyond its interval

# budget -> (the figure measured, whether the figure must be at most the limit)
FIGURE = {"max_memory": ("memory", True), "min_tokens_per_s": ("decode", False), "max_ttft": ("ttft", True)}
FIELDS = {"max_memory": "max_memory_bytes", "min_tokens_per_s": "min_tokens_per_s", "max_ttft": "max_ttft_s"}


@dataclass(frozen=True)
class Verdict:
    """One budget against the measured figure (and, for a relative budget, the measured ratio)."""

    name: str  # max_memory | min_tokens_per_s | max_ttft
    limit: float  # the absolute limit (a relative budget's: the factor x the predicted dense figure)
    factor: float | None  # a relative budget's factor of the dense model's figure
    figure: Interval  # the built model's figure over the rounds
    ratio: Interval | None  # the built model's over the dense model's, per round (relative budgets)
    status: str  # MET | MISSED | UNDECIDED

    @property
    def at_most(self) -> bool:
        return FIGURE[self.name][1]

    def budget_text(self) -> str:
        op = OPS[self.name]
        if self.factor is not None and self.ratio is not None:
            return f"{LABELS[self.name]} {op} {self.factor:g}x the dense model's"
        return f"{LABELS[self.name]} {op} {format_value(self.name, self.limit)}"

    def measured_text(self) -> str:
        text = self.figure.text(lambda v: format_value(self.name, v))
        if self.ratio is not None:
            r = self.ratio
            spread = "(one run)" if r.n == 1 else f"[{r.low:.3f}, {r.high:.3f}]"
            text += f" = {r.median:.3f}x {spread} the dense model's"
        return text

    def describe(self) -> str:
        """'decode >= 1.1x the dense model's: 145.7 tokens/s [140.1 tokens/s, 150.2 tokens/s] =
        1.214x [1.160, 1.262] the dense model's: met' (on one line)."""
        return f"{self.budget_text()}: {self.measured_text()}: {self.status}"

    def to_dict(self) -> dict:
        return {"name": self.name, "limit": self.limit, "factor": self.factor,
                "figure": self.figure.to_dict(), "ratio": self.ratio.to_dict() if self.ratio else None,
                "status": self.status, "met": self.status == MET, "text": self.describe()}


def verdicts(budgets: Budgets, m: Measurement, key: Hashable) -> list[Verdict]:
    """Each budget that is set against candidate ``key`` of the measurement: a relative budget on
    the ratio to the reference (the dense model, measured in the same rounds), an absolute one on
    the figure against its limit."""
    out = []
    for name, (metric, at_most) in FIGURE.items():
        limit = getattr(budgets, FIELDS[name])
        if limit is None:
            continue
        figure = m.figure(key, metric)
        factor = budgets.relative.get(name)
        if factor is not None:
            if m.reference is None:
                raise ValueError(f"a relative budget ({name} {factor:g}x) needs the dense model measured "
                                 "in the same rounds")
            ratio = m.ratio(key, metric)
            out.append(Verdict(name, limit, factor, figure, ratio, judge(ratio, factor, at_most)))
        else:
            out.append(Verdict(name, limit, factor, figure, None, judge(figure, limit, at_most)))
    return out


def measured_section(budgets: Budgets, m: Measurement, key: Hashable) -> dict:
    """The report's measured figures of candidate ``key``: each figure's median (the keys a
    single run had: memory_bytes, decode_tokens_per_s, ...), every interval, the ratios to the
    reference, the rounds, and the verdict on each budget."""
    figure = {metric: m.figure(key, metric) for metric in ("memory", "decode", "prefill", "ttft")}
    out = {"memory_bytes": figure["memory"].median, "decode_tokens_per_s": figure["decode"].median,
           "prefill_tokens_per_s": figure["prefill"].median, "ttft_s": figure["ttft"].median,
           "context": m.runs[key][0]["context"], **m.to_dict(key),
           "reference": None if m.reference is None or m.reference == key else str(m.reference),
           "verdicts": [v.to_dict() for v in verdicts(budgets, m, key)]}
    return out


def outcome(statuses: list[dict]) -> tuple[int, str | None]:
    """The exit status for a run's verdicts (Verdict.to_dict()s) and its last line: MISSED_EXIT and
    the budgets missed, else 0 and the budgets undecided (None when all were met)."""
    missed = [v["text"] for v in statuses if v["status"] == MISSED]
    if missed:
        return MISSED_EXIT, "budget missed beyond its interval: " + "; ".join(missed)
    undecided = [v["text"] for v in statuses if v["status"] == UNDECIDED]
    if undecided:
        return 0, ("undecided (the interval straddles the budget; a longer --measure-time or a quieter "
                   "machine narrows it): " + "; ".join(undecided))
    return 0, None
