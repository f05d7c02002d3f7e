"""The data-driven allocation: ladder errors, the exact knapsack, the rule, the plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import corpus
from mosaic_export.method.allocation import allocate
from mosaic_export.method.calibration import LayerStream, sample_windows, tokenize
from mosaic_export.method.knapsack import (
    SPARSITY_LEVELS,
    STEP,
    parameter_units,
    solve_levels,
    solve_ratios,
    window,
)
from mosaic_export.method.plan import PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.method.pod import measure, wanda_scores
from mosaic_export.method.prune.structured import compensate, head_options
from mosaic_export.method.prune.wanda import wanda_mask
from mosaic_export.method.reconstruction import STRUCTURE_LADDER, ladder_errors, removal_error
from mosaic_export.model.arch import LayerDims
from mosaic_export.model.load import load_model
from mosaic_export.model.names import ATTENTION, MLP

NAMES = ["q", "k", "v", "o", "gate", "up", "down"]


def brute_force(errors, costs, budget, allowed):
    best = None
    options = [np.flatnonzero(a) for a in allowed]
    for levels in itertools.product(*options):
        cost = sum(int(costs[j, lv]) for j, lv in enumerate(levels))
        if cost < budget:
            continue
        err = sum(float(errors[j, lv]) for j, lv in enumerate(levels))
        if best is None or err < best[0] - 1e-12:
            best = (err, levels)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    cells, levels = 5, 5
    weights = rng.integers(1, 6, size=cells)
    costs = weights[:, None] * np.arange(levels)[None, :]
    # errors grow with the level, at a rate of each cell's own
    errors = np.cumsum(rng.random((cells, levels)) * rng.random((cells, 1)) * 3, axis=1)
    errors[:, 0] = 0.0
    allowed = rng.random((cells, levels)) < 0.8
    allowed[:, -1] = True
    budget = int(rng.integers(1, int(costs[:, -1].sum()) + 1))
    chosen = solve_levels(errors, costs, budget, allowed)
    expected_err, _ = brute_force(errors, costs, budget, allowed)
    assert sum(int(costs[j, lv]) for j, lv in enumerate(chosen)) >= budget
    assert all(allowed[j, lv] for j, lv in enumerate(chosen))
    assert sum(float(errors[j, lv]) for j, lv in enumerate(chosen)) == pytest.approx(expected_err)


def test_knapsack_refuses_an_unreachable_budget():
    with pytest.raises(ValueError, match="exceeds"):
        solve_levels(np.zeros((2, 3)), np.array([[0, 1, 2], [0, 1, 2]]), 5, np.ones((2, 3), bool))


def test_knapsack_caps_an_unreachable_budget_at_the_costliest_allowed_levels():
    allowed = np.ones((2, 3), bool)
    allowed[0, 2] = False
    costs = np.array([[0, 1, 2], [0, 1, 2]])
    assert solve_levels(np.zeros((2, 3)), costs, 5, allowed, cap=True) == [1, 2]
    # a reachable budget is untouched by the cap
    assert solve_levels(np.array([[0, 1, 9], [0, 2, 3]]), costs, 2, allowed, cap=True) == [1, 1]


def test_parameter_units_are_exact_in_gcd_units():
    costs, unit = parameter_units([331776, 110592, 884736], 3)
    assert unit == 110592
    assert costs.tolist() == [[0, 3, 6], [0, 1, 2], [0, 8, 16]]


def test_window_takes_the_nearest_levels_in_any_order():
    shares = [0.83, 0.75, 0.5, 0.33, 0.25, 0.0, 0.67]
    assert window(shares, 0.3, 0.02).tolist() == [False, False, False, True, True, False, False]
    assert window(shares, 0.3, 0.25).tolist() == [False, False, True, True, True, False, False]
    assert window(sorted(shares), 0.5, 0.0).tolist() == [False, False, False, True, False, False, False]
    assert window([0.0, 0.5], 0.97, 0.01).tolist() == [False, True]  # above the top: the top


def test_ratios_meet_the_budget_and_stay_near_the_target():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([300.0, 100, 800, 800, 300])
    errors = torch.cumsum(torch.rand(5, len(SPARSITY_LEVELS), generator=g), 1)
    ratios = solve_ratios(errors, counts, 0.6, 0.1)
    assert float((ratios * counts).sum() / counts.sum()) >= 0.6 - 1e-12
    assert float((ratios - 0.6).abs().max()) <= 0.1 + 1e-9
    assert all(round(float(r) / STEP, 6).is_integer() for r in ratios)


def test_error_rule_prunes_the_robust_type_more_and_meets_the_mean():
    """Cells whose error grows slowly (robust) are pruned more; the mean is the target exactly."""
    n = 4
    slope = {"q": 0.2, "down": 2.0}  # q's error grows ten times slower than down's
    ladder = torch.tensor(SPARSITY_LEVELS, dtype=torch.float64)
    errors = {p: (slope[p] * ladder ** 2).expand(n, -1).clone() for p in slope}
    weights = {"q": torch.full((n,), 100.0), "down": torch.full((n,), 300.0)}
    pod = {p: torch.zeros(n) for p in slope}
    r = allocate("error", 0.5, 0.2, pod, torch.zeros(n), weights, errors)
    assert float(r["q"].mean()) > 0.5 > float(r["down"].mean())
    mean = sum(float((r[p] * weights[p]).sum()) for p in r) / sum(float(w.sum()) for w in weights.values())
    assert mean == pytest.approx(0.5, abs=1e-9)
    assert float(r["q"].max()) <= 0.7 + 1e-6  # within lambda (0.2) of the target, before the shift
    with pytest.raises(ValueError, match="needs the measured errors"):
        allocate("error", 0.5, 0.2, pod, torch.zeros(n), weights)


def test_ladder_errors_match_the_output_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=g)
    x = torch.randn(50, 10, generator=g) * torch.linspace(0.2, 3, 10)
    h = x.T @ x
    scores = wanda_scores(w, x.norm(dim=0))
    errors = ladder_errors(w, h, scores)
    assert len(errors) == len(SPARSITY_LEVELS) and errors[0] == 0.0
    energy = float(((x @ w.T) ** 2).sum())
    for level in (4, 20, 38):
        pruned = w.masked_fill(wanda_mask(w, x.norm(dim=0), SPARSITY_LEVELS[level]), 0.0)
        expected = float(((x @ (w - pruned).T) ** 2).sum()) / energy
        assert errors[level] == pytest.approx(expected, rel=1e-4)
    assert errors == sorted(errors)  # a larger mask of the same order never lowers the error


def test_error_plan_on_the_tiny_model(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    ids = sample_windows(tokenize(loaded.tokenizer, corpus("builtin")), 2, 32, 0, "builtin")
    measured = measure(LayerStream(loaded.model, loaded.spec, ids), loaded.spec, loaded.shape, 5.0,
                       errors={"projection"})
    assert all(len(m.projection_errors[p]) == len(SPARSITY_LEVELS) for m in measured for p in NAMES)
    assert all(m.group_errors is None for m in measured)  # only what the plan needs
    settings = PruneSettings(sparsity=0.6, allocation="error", lam=0.15)
    plan = make_plan(loaded.shape, loaded.source, measured, settings)
    again = make_plan(loaded.shape, loaded.source, measured, settings)
    assert plan.to_json() == again.to_json()  # deterministic
    p = plan.params()
    assert 1 - p["decoder_nonzero"] / p["decoder_dense"] == pytest.approx(0.6, abs=0.02)
    ratios = [lp.ratios[q] for lp in plan.layers for q in NAMES]
    assert max(ratios) - min(ratios) > 0.01  # it did move pruning between cells
    plain = measure(LayerStream(loaded.model, loaded.spec, ids), loaded.spec, loaded.shape, 5.0)
    with pytest.raises(ValueError, match="needs the measured errors"):
        make_plan(loaded.shape, loaded.source, plain, settings)
    with pytest.raises(UserError, match="--structured-fraction 0 or 1"):
        PruneSettings(sparsity=0.3, structured_fraction=0.5, allocation="error").validate()
    with pytest.raises(UserError, match="magnitude"):
        PruneSettings(sparsity=0.3, structured_fraction=1, allocation="error",
                      structured_scores="magnitude").validate()
    with pytest.raises(UserError, match="--structure blocks"):
        PruneSettings(sparsity=0.3, structured_fraction=1, allocation="error", structure="blocks").validate()


def test_removal_error_is_the_compensated_output_error():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 12, generator=g)
    x = torch.randn(80, 12, generator=g) @ torch.randn(12, 12, generator=g)  # correlated inputs
    h = x.T @ x
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    kept = compensate(w, h, keep)
    expected = float(((x @ w.T - x[:, keep] @ kept.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert removal_error(w, h, keep) == pytest.approx(expected, rel=1e-3)
    dropped = float(((x[:, 1:] @ w[:, 1:].T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert 0 < removal_error(w, h, torch.arange(1, 12)) <= dropped  # compensation only helps
    assert removal_error(w, h, torch.arange(12)) == 0.0
    assert removal_error(w, h, torch.tensor([], dtype=torch.long)) == 1.0


def structured_plan(loaded, measured, sparsity=0.3, lam=0.2):
    settings = PruneSettings(sparsity=sparsity, structured_fraction=1.0, allocation="error", lam=lam)
    return make_plan(loaded.shape, loaded.source, measured, settings.validate())


def test_error_structure_lands_on_the_target_and_follows_the_errors(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    ids = sample_windows(tokenize(loaded.tokenizer, corpus("builtin")), 2, 32, 0, "builtin")
    settings = PruneSettings(sparsity=0.3, structured_fraction=1.0, allocation="error")
    assert settings.error_kinds() == {"structure"} and PruneSettings(allocation="error").error_kinds(
        searched=True) == {"structure"} and PruneSettings(allocation="error").error_kinds() == {"projection"}
    measured = measure(LayerStream(loaded.model, loaded.spec, ids), loaded.spec, loaded.shape, 5.0,
                       errors=settings.error_kinds())
    assert all(m.projection_errors is None for m in measured)
    shape = loaded.shape
    options = head_options(shape.n_head, shape.n_kv)
    for m in measured:
        assert len(m.group_errors["attn"]) == len(options)
        assert m.group_errors["attn"][options.index((shape.n_kv, shape.n_head // shape.n_kv))] == 0.0
        assert len(m.group_errors["mlp"]) == len(STRUCTURE_LADDER) and m.group_errors["mlp"][0] == 0.0
    plan = structured_plan(loaded, measured, lam=0.1)
    assert plan.to_json() == structured_plan(loaded, measured, lam=0.1).to_json()  # deterministic
    p = plan.params()
    assert 1 - p["decoder_nonzero"] / p["decoder_dense"] == pytest.approx(0.3, abs=0.005)
    assert p["decoder_resized"] <= p["decoder_dense"] * 0.705  # by structure, not by zeros
    def group(h, kv, names):
        return sum(shape.projection_params(q, LayerDims(h, kv, shape.n_ff)) for q in names)

    attn_dense = group(shape.n_head, shape.n_kv, ATTENTION)
    ratio = 0.3 * shape.layer_params(shape.dense_dims) / (attn_dense + group(shape.n_head, shape.n_kv, MLP))
    allowed = window([1 - group(g * q, g, ATTENTION) / attn_dense for g, q in options], ratio, 0.1)
    inside = {options[i] for i in np.flatnonzero(allowed)}
    assert len(inside) < len(options)  # lambda leaves some layouts out
    for lp in plan.layers:  # every head layout within lambda of the target, or the nearest
        assert (lp.dims.n_kv, lp.dims.n_head // lp.dims.n_kv) in inside

    # Make every layer's MLP nearly free to cut but the first layer's very costly, and attention
    # costly everywhere: the first layer keeps the widest MLP, and heads go last.
    for i, m in enumerate(measured):
        m.group_errors = {"attn": [0.0 if o == options[-1] else 1000.0 for o in options],
                          "mlp": [level * (100.0 if i == 0 else 0.01) for level in STRUCTURE_LADDER]}
    steered = structured_plan(loaded, measured, lam=0.3)
    widths = [lp.dims.n_ff for lp in steered.layers]
    assert widths[0] == max(widths) and widths[0] > min(widths)
    assert all(lp.dims.n_head == shape.n_head for lp in steered.layers)
