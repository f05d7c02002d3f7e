"""Figures as statistics: the median of repeated runs with a distribution-free confidence
interval, and a verdict of a budget against it (met, missed, or undecided).

The interval is the order-statistic interval of the median (Hahn & Meeker, "Statistical
Intervals", 2.7): with n sorted values x(1) <= ... <= x(n), the interval [x(k), x(n+1-k)]
covers the true median with probability 1 - 2 P(B <= k - 1), B ~ Binomial(n, 1/2), whatever the
distribution of the noise. Runs on a shared machine are not normal: most are close, a few are
slowed by a burst of other work. The median ignores those bursts and the interval needs no
assumption about them. Its price: with fewer than 6 values no interval reaches 95% (the widest,
[min, max], covers 1 - 2^(1-n): 94% at 5 values); the confidence actually reached is stated
with every interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95  # the level every interval aims for
# The least coverage an interval needs to decide a verdict: [min, max] of 5 runs (94%) decides, of
# 4 runs (88%) not; a measurement cut short by its time cap before that is undecided.
DECIDES = 0.9

MET, MISSED, UNDECIDED = "met", "missed", "undecided"


@dataclass(frozen=True)
class Interval:
    """The median of ``n`` values and a confidence interval around it."""

    median: float
    low: float
    high: float
    n: int
    confidence: float  # the coverage actually reached (below CONFIDENCE with too few values)

    @property
    def half_width(self) -> float:
        """Half the interval's width, as a fraction of the median (0.05: within +-5%)."""
        if self.median == 0:
            return math.inf if self.high > self.low else 0.0
        return (self.high - self.low) / 2 / abs(self.median)

    def scaled(self, factor: float) -> Interval:
        """The interval of ``factor`` times the figure (factor > 0)."""
        return Interval(self.median * factor, self.low * factor, self.high * factor, self.n,
                        self.confidence)

    def text(self, fmt=lambda v: f"{v:.4g}") -> str:
        """'131.2 [125.0, 138.4]' (the median, then the interval); '131.2 (one run)' for one value."""
        if self.n == 1:
            return f"{fmt(self.median)} (one run)"
        return f"{fmt(self.median)} [{fmt(self.low)}, {fmt(self.high)}]"

    def to_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "n": self.n,
                "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: dict) -> Interval:
        return cls(d["median"], d["low"], d["high"], d["n"], d["confidence"])


def binomial_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def order_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, float]:
    """The rank k (1-based) of the interval [x(k), x(n+1-k)] that reaches ``confidence`` with the
    narrowest width, and the coverage it reaches; k = 1 (min, max) when nothing reaches it."""
    best = 1
    for k in range(1, (n + 1) // 2 + 1):
        if 1 - 2 * binomial_cdf(k - 1, n) >= confidence:
            best = k
        else:
            break
    return best, 1 - 2 * binomial_cdf(best - 1, n)


def least_values(confidence: float = CONFIDENCE) -> int:
    """The fewest values whose [min, max] interval reaches ``confidence`` (6 at 95%)."""
    n = 1
    while 1 - 2 * binomial_cdf(0, n) < confidence:
        n += 1
    return n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median of ``values`` and its order-statistic confidence interval."""
    if not values:
        raise ValueError("an interval of no values")
    x = sorted(values)
    n = len(x)
    if n == 1:
        return Interval(x[0], x[0], x[0], 1, 0.0)
    k, reached = order_ranks(n, confidence)
    return Interval(statistics.median(x), x[k - 1], x[n - k], n, reached)


def judge(interval: Interval, limit: float, at_most: bool) -> str:
    """A budget against a measured interval: MET when the whole interval is on the budget's side,
    MISSED when the whole interval is beyond it, UNDECIDED when it straddles the limit.
    ``at_most``: the figure must be <= limit (memory, time to first token); else >= (speed).
    An interval of less than DECIDES coverage (too few runs) decides nothing: UNDECIDED."""
    if interval.confidence < DECIDES:
        return UNDECIDED
    if at_most:
        if interval.high <= limit:
            return MET
        return MISSED if interval.low > limit else UNDECIDED
    if interval.low >= limit:
        return MET
    return MISSED if interval.high < limit else UNDECIDED
