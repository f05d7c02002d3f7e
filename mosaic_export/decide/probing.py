"""Where the joint search's structural probe looks: the types that could beat the best dense type
that meets the budgets (competitive), the removal levels measured (probe_levels), when to stop
(probe_stop, ruled_out), and the levels where recovery is probed too."""

from __future__ import annotations

import math

from mosaic_export.decide.quality import OVERSHOOT, share_points
from mosaic_export.decide.search import SearchResult

# Removal levels the structural probe may measure. A type that needs more than the last to fit
# is not predicted (its candidates cannot be chosen): at 60% removed a model has lost most of
# its quality, and probing further would cost more than it could tell.
PROBE_LEVELS = (0.15, 0.30, 0.45, 0.60)
TIE = 1e-3  # predicted log-perplexities this close are a tie, broken by decode speed


def dense_bar(searches: dict[str, SearchResult | str], type_deltas: dict[str, float]) -> float:
    """The predicted change of the best type that meets the budgets without pruning (infinite when
    none does): what a pruned candidate has to beat."""
    return min((type_deltas[t] for t, s in searches.items()
                if isinstance(s, SearchResult) and s.chosen.target == 0), default=math.inf)


def competitive(searches: dict[str, SearchResult | str], type_deltas: dict[str, float]) -> dict[str, float]:
    """Types whose least feasible removal is above 0 (and within PROBE_LEVELS) and whose quantization
    alone costs less than the best dense type that meets the budgets: {type: removed share}.
    Only these need the structural probe."""
    bar = dense_bar(searches, type_deltas)
    out = {}
    for t, s in searches.items():
        if isinstance(s, SearchResult) and s.chosen.target > 0 and type_deltas[t] < bar:
            removed = s.chosen.plan.removed()
            if removed <= PROBE_LEVELS[-1] + 1e-9:
                out[t] = removed
    return out


def probe_levels(removals: list[float], ladder: tuple[float, ...] = PROBE_LEVELS) -> list[float]:
    """PROBE_LEVELS levels up to the first at or above the largest removal: enough to interpolate every
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
