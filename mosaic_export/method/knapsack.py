"""Choosing one pruning level per projection under a parameter budget (the ``error`` allocation).

Each cell j (a projection of a layer) has a ladder of levels l (ratio SPARSITY_LEVELS[l]); taking level l
costs ``costs[j, l]`` parameter units (integers) and adds ``errors[j, l]`` to the objective. The
solver picks one allowed level per cell so that the total cost reaches the budget and the total
error is least: a multiple-choice knapsack, solved exactly by dynamic programming over the
cost already spent (states 0 .. the largest total cost). Time O(cells x levels x states).
"""

from __future__ import annotations

import math

import numpy as np
import torch

STEP = 0.025
SPARSITY_LEVELS = tuple(round(i * STEP, 4) for i in range(int(round(0.95 / STEP)) + 1))  # 0 .. 0.95
MAX_STATES = 2_000_000  # above this, costs are coarsened (rounded up) to fit


def solve_levels(errors: np.ndarray, costs: np.ndarray, budget: int, allowed: np.ndarray,
                 cap: bool = False) -> list[int]:
    """Levels (one per cell) with total cost >= budget and the least total error.

    errors: (cells, levels) float; costs: (cells, levels) non-negative integers; allowed: (cells,
    levels) bool. Ties go to the smaller total cost, then (backtracking from the last cell) to
    the lower level in later cells.
    When even the most costly allowed levels miss the budget: with ``cap``, the budget becomes
    what they remove (every cell at its costliest allowed level; the caller makes up the rest);
    without, ValueError.
    """
    costs = np.asarray(costs, dtype=np.int64)
    errors = np.where(allowed, np.asarray(errors, dtype=np.float64), np.inf)
    top = int(np.where(allowed, costs, 0).max(axis=1).sum())
    if cap:
        budget = min(budget, top)
    if budget > top:
        raise ValueError(f"the budget {budget} exceeds the most the allowed levels remove ({top})")
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(costs), top + 1), dtype=np.int16)
    for j in range(len(costs)):
        new = np.full(top + 1, np.inf)
        for level in np.flatnonzero(allowed[j]):
            c, e = int(costs[j, level]), float(errors[j, level])
            candidate = best[:top + 1 - c] + e
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            choice[j, c:][better] = level
        best = new
    spent = budget + int(np.argmin(best[budget:]))  # argmin: the first, so the least cost of ties
    if not math.isfinite(best[spent]):
        raise ValueError("no combination of allowed levels reaches the budget")
    levels = []
    for j in reversed(range(len(costs))):
        level = int(choice[j, spent])
        levels.append(level)
        spent -= int(costs[j, level])
    return levels[::-1]


def integer_units(costs: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-negative integer costs divided by their gcd, so that the states are few and exact;
    coarsened (rounded up) when that would make more than MAX_STATES states. Returns the costs in
    units and the unit."""
    costs = np.asarray(costs, dtype=np.int64)
    g = int(np.gcd.reduce(costs.ravel())) or 1
    scale = max(1, math.ceil(int((costs // g).max(axis=1).sum()) / MAX_STATES))
    return -(-costs // (g * scale)), g * scale


def parameter_units(counts: list[int], levels: int) -> tuple[np.ndarray, int]:
    """Integer costs (cells, levels) proportional to count x SPARSITY_LEVELS[level], and the divisor: in
    units of gcd(counts) / ladder denominator (integer_units)."""
    steps = np.arange(levels, dtype=np.int64)
    return integer_units(np.array(counts, dtype=np.int64)[:, None] * steps[None, :])


def window(shares, target: float, spread: float) -> np.ndarray:
    """Which levels (shares removed, in any order) lie within ``spread`` of the target, with the
    levels nearest below and above the target always in."""
    shares = np.asarray(shares, dtype=np.float64)
    near = np.abs(shares - target) <= spread + 1e-12
    below, above = shares[shares <= target + 1e-9], shares[shares >= target - 1e-9]
    if below.size:
        near |= shares == below.max()
    if above.size:
        near |= shares == above.min()
    return near


def solve_ratios(errors: torch.Tensor, counts: torch.Tensor, target: float, spread: float) -> torch.Tensor:
    """Ratios (cells,) from the SPARSITY_LEVELS, chosen to remove at least ``target`` of the parameters
    (weighted by counts) at the least total error, each within ``spread`` of the target (the
    ladder levels just below and above the target always allowed)."""
    n_levels = errors.shape[1]
    ladder = np.array(SPARSITY_LEVELS[:n_levels])
    costs, unit = parameter_units([int(c) for c in counts.tolist()], n_levels)
    total = float(counts.double().sum())
    budget = math.ceil(target * total / (unit * STEP) - 1e-9)
    near = window(ladder, target, spread)
    allowed = np.broadcast_to(near, errors.shape)
    # capped only for a target above the ladder's top (0.95): the caller's shift does the rest
    levels = solve_levels(errors.double().numpy(), costs, budget, allowed, cap=True)
    return torch.tensor(ladder[levels], dtype=torch.float64)
