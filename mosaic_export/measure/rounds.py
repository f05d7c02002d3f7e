"""Interleaved rounds: every speed or memory figure of the tool is measured here.

Each candidate (a model file in its runtime, say) is run once per round, each run in a fresh
process (the callables given run one), candidates in turn and in the reverse order on the next
round, so that a slow spell of a shared machine hits every candidate alike instead of one. After
``least`` rounds the rounds go on until every figure's interval (stats.median_interval: the
median and its order-statistic interval) is within ``precision`` of its median, and so is every
candidate's ratio to the reference, or until the next round would pass the time cap.

A comparison is a ratio taken within each round (candidate / reference, the same round), then
its median and interval over rounds: a slowdown that hits both runs of a round cancels in their
ratio, where it would widen both figures' intervals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from mosaic_export.measure.stats import CONFIDENCE, Interval, least_values, median_interval

# A figure of a benchmark result: how to read it, and whether more is better.
METRICS = {
    "decode": ("decode tokens/s", True),
    "prefill": ("prefill tokens/s", True),
    "ttft": ("time to first token (s)", False),
    "memory": ("peak RSS (bytes)", False),
}


def figures(result: dict) -> dict[str, float | None]:
    """A runtime benchmark's figures (targets' benchmark(): decode, prefill, peak RSS); the time to
    first token is the prefill of the prompt plus one decode step. The peak memory only of a run
    that filled its context ("filled", true unless said otherwise): else None."""
    decode = result["decode"]["tokens_per_s"]
    memory = float(result["peak_rss_bytes"]) if result.get("filled", True) else None
    return {"decode": decode, "prefill": result["prefill"]["tokens_per_s"],
            "ttft": result["prefill"]["seconds"] + 1 / decode, "memory": memory}


@dataclass(frozen=True)
class Policy:
    """When rounds stop: each figure's interval within ``precision`` (a fraction of its median)
    at ``confidence``, or the time cap ``max_seconds`` (a round is not started when it would end
    past it), and never before ``least`` rounds nor after ``most``."""

    precision: float = 0.05
    max_seconds: float = 60.0
    least: int = 3
    most: int = 40
    confidence: float = CONFIDENCE

    def __post_init__(self):
        if not 0 < self.precision < 1:
            raise ValueError(f"precision must be in (0, 1), got {self.precision}")
        if self.max_seconds < 0 or self.least < 1 or self.most < self.least:
            raise ValueError(f"bad rounds policy: {self}")


# The main command's measurement of the built model beside the dense one (and the neighbour):
# 5 rounds at least, enough for a 94% interval that decides a verdict (stats.DECIDES), with the
# context filled (memory is measured in them), then speed-only rounds until every interval is
# within +-5% or 150 s have passed.
VERDICT_POLICY = Policy(precision=0.05, max_seconds=150.0, least=5)


# `mosaic-export bench`: a model on its own (or against another), as many rounds as a minute allows.
BENCH_POLICY = Policy(precision=0.05, max_seconds=60.0, least=5)


# The joint search's dense runs, one per type: the first round (which also scores each type's
# perplexity on the probe and fills the context), then speed-only rounds while the time cap
# allows (the run's --measure-time and --precision replace these two).
JOINT_POLICY = Policy(precision=0.05, max_seconds=150.0, least=1)


@dataclass
class Measurement:
    """Every run of every candidate, round by round, and what the figures say."""

    runs: dict[Hashable, list[dict]]  # candidate -> its runs' results, one per round
    reference: Hashable | None  # what ratios are taken against
    seconds: float
    stopped: str  # "precise" | "time cap" | "most rounds"
    confidence: float = CONFIDENCE
    metrics: tuple[str, ...] = ("decode", "prefill", "memory")
    precision: float = 0.05

    @property
    def rounds(self) -> int:
        return min(len(r) for r in self.runs.values())

    def values(self, key: Hashable, metric: str) -> list[float]:
        """The candidate's figure in each round that measured it."""
        return [v for v in self.per_round(key, metric) if v is not None]

    def per_round(self, key: Hashable, metric: str) -> list[float | None]:
        """The candidate's figure round by round; None where a round did not measure it."""
        return [figures(r)[metric] for r in self.runs[key]]

    def figure(self, key: Hashable, metric: str) -> Interval:
        """The median of a candidate's figure over rounds, with its interval."""
        return median_interval(self.values(key, metric), self.confidence)

    def ratio(self, key: Hashable, metric: str, against: Hashable | None = None) -> Interval:
        """The candidate's figure over the reference's (or ``against``'s), taken in each round;
        median and interval."""
        against = self.reference if against is None else against
        if against is None:
            raise ValueError("no reference was measured")
        mine, ref = self.per_round(key, metric), self.per_round(against, metric)
        pairs = [a / b for a, b in zip(mine, ref, strict=False) if a is not None and b is not None]
        return median_interval(pairs, self.confidence)

    def intervals(self) -> dict[str, Interval]:
        """Every figure and ratio the stopping rule watches, by name ("key decode", "key/ref decode")."""
        out = {}
        for key in self.runs:
            for m in self.metrics:
                out[f"{key} {m}"] = self.figure(key, m)
                if self.reference is not None and key != self.reference:
                    out[f"{key}/{self.reference} {m}"] = self.ratio(key, m)
        return out

    def wide(self) -> list[str]:
        """The figures whose interval is still wider than the precision."""
        return [name for name, iv in self.intervals().items() if iv.half_width > self.precision]

    def precise(self) -> bool:
        """Every interval within the precision, at the confidence aimed for; a figure no longer
        measured (the peak memory, after the rounds that fill the context) by its width alone."""
        return all(iv.half_width <= self.precision
                   and (iv.confidence >= self.confidence or iv.n < self.rounds)
                   for iv in self.intervals().values())

    def summary(self) -> str:
        """One line: how many rounds, how long, why they stopped, how many intervals are still wide."""
        intervals = self.intervals().values()
        wide, n = self.wide(), len(intervals)
        reached = min(iv.confidence for iv in intervals)
        if self.rounds == 1:
            rest = "; one run each: no interval"
        elif wide:
            rest = f"; {len(wide)} of {n} intervals ({reached:.0%}) still wider than +-{self.precision:.0%}"
        else:
            rest = f"; every interval ({reached:.0%}) within +-{self.precision:.0%}"
        rounds = "1 round" if self.rounds == 1 else f"{self.rounds} rounds"
        return (f"{len(self.runs)} candidates measured in {rounds}, {self.seconds:.0f} s "
                f"(stopped: {self.stopped}){rest}")

    def to_dict(self, key: Hashable) -> dict:
        """One candidate's figures and ratios as intervals, with the rounds they came from."""
        out = {"rounds": self.rounds, "seconds": self.seconds, "stopped": self.stopped,
               "memory_rounds": len(self.values(key, "memory")),
               "figures": {m: self.figure(key, m).to_dict() for m in METRICS},
               "runs": [figures(r) for r in self.runs[key]]}
        if self.reference is not None and key != self.reference:
            out["ratios"] = {m: self.ratio(key, m).to_dict() for m in METRICS}
        return out


def interleaved(runs: dict[Hashable, Callable[[int], dict]], policy: Policy = Policy(),
                reference: Hashable | None = None, metrics: Sequence[str] = ("decode", "prefill", "memory"),
                clock: Callable[[], float] = time.monotonic, log=None) -> Measurement:
    """Run every candidate once per round (``runs[key](round)`` runs it once, in a fresh process,
    and returns its benchmark result), round after round, until the policy stops them."""
    if reference is not None and reference not in runs:
        raise ValueError(f"the reference {reference!r} is not among the candidates")
    keys = list(runs)
    results: dict[Hashable, list[dict]] = {k: [] for k in keys}
    start = clock()
    m = Measurement(results, reference, 0.0, "most rounds", policy.confidence, tuple(metrics),
                    policy.precision)
    full = max(policy.least, least_values(policy.confidence))  # rounds for a full-confidence interval
    for r in range(policy.most):
        began = clock()
        for key in (keys if r % 2 == 0 else keys[::-1]):
            results[key].append(runs[key](r))
        now = clock()
        m.seconds = now - start
        done = r + 1
        if done >= policy.least and done >= full and m.precise():
            m.stopped = "precise"
            break
        # the next round's length: the last one's; the first round past the least ones is of
        # another kind (benchmarks.runner: no context fill), so it is started while time is left
        expected = now - began if done > policy.least else 0.0
        if done >= policy.least and now - start + expected > policy.max_seconds:
            m.stopped = "time cap"
            break
    if log is not None:
        log(f"  {m.summary()}")
    return m
