"""The joint search over type, structure and recovery: the quality model's combination rule, the
choice with injected quality figures (a dense type wins, a pruned plan wins, nothing fits), and
the whole command on the tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from mosaic_export.cli import main
from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import corpus
from mosaic_export.decide.costmodel import Calibration, Format, Pricing
from mosaic_export.decide.joint import choose, options, type_searches
from mosaic_export.decide.probing import competitive, probe_levels, probe_stop, recovery_levels, ruled_out
from mosaic_export.decide.profile import Budgets
from mosaic_export.decide.quality import (
    OVERSHOOT,
    QualityModel,
    log_error,
    recovered_share,
    share_points,
    structure_points,
)
from mosaic_export.method.calibration import LayerStream, sample_windows, tokenize
from mosaic_export.method.plan import PruneSettings
from mosaic_export.method.pod import measure
from mosaic_export.model.load import load_model

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2", "--eval-seq-len", "64"]
TYPES = ("fp32", "fp16", "int8")


# --- the quality model ---------------------------------------------------------------------------

def test_prediction_adds_log_changes_and_interpolates_structure():
    q = QualityModel(10.0, {"fp32": 0.0, "int8": 0.05}, ((0.2, 0.3), (0.4, 0.9)),
                     recovered_share=((0.3, 0.5),))  # one point: the share at every removal
    assert q.delta("fp32", 0.0) == 0.0
    assert q.delta("int8", 0.0) == pytest.approx(0.05)
    assert q.delta("int8", 0.1) == pytest.approx(0.05 + 0.15)  # half way from (0, 0) to (0.2, 0.3)
    assert q.delta("int8", 0.3) == pytest.approx(0.05 + 0.6)
    assert q.delta("int8", 0.3, recovered=True) == pytest.approx(0.05 + 0.3)
    assert q.delta("int8", 0.405) == pytest.approx(0.05 + 0.9 + 0.005 * 3)  # the last slope, 1% on
    assert q.delta("int8", 0.42) is None  # further past the last probed level: not predicted
    assert q.delta("fp16", 0.1) is None  # a type not measured
    assert QualityModel(10.0, {"fp32": 0.0}).delta("fp32", 0.005) is None  # no structure probed
    assert QualityModel(10.0, {"fp32": 0.0}, ((0.2, 0.3),)).delta("fp32", 0.2, recovered=True) is None
    assert q.perplexity("int8", 0.2) == pytest.approx(10.0 * math.exp(0.35))
    assert q.perplexity("int8", 0.2, dense=20.0) == pytest.approx(20.0 * math.exp(0.35))


def test_measured_points_become_log_changes():
    points = structure_points(10.0, [(0.4, 40.0), (0.2, 20.0)])
    assert [r for r, _ in points] == [0.2, 0.4]
    assert [d for _, d in points] == pytest.approx([math.log(2), math.log(4)])
    assert recovered_share(10.0, 40.0, 20.0) == pytest.approx(0.5)  # log 2 of log 4 closed
    assert recovered_share(10.0, 40.0, 50.0) == 0.0 and recovered_share(10.0, 40.0, 9.0) == 1.0
    # Shares measured at two levels: interpolated between them, the nearest one's outside.
    points = share_points(10.0, [(0.2, 0.2, 20.0), (0.4, 0.4, 40.0)], [(0.4, 20.0), (0.2, 10.0)])
    assert [r for r, _ in points] == [0.2, 0.4] and [s for _, s in points] == pytest.approx([1.0, 0.5])
    q = QualityModel(10.0, {"fp32": 0.0}, ((0.2, math.log(2)), (0.4, math.log(4))), points)
    assert [q.share(r) for r in (0.1, 0.3, 0.5)] == pytest.approx([1.0, 0.75, 0.5])
    assert q.delta("fp32", 0.3, recovered=True) == pytest.approx(math.log(2) * 1.5 * 0.25)
    assert log_error(11.0, 10.0) == pytest.approx(math.log(1.1))


def test_probe_levels_cover_the_largest_competitive_removal():
    assert probe_levels([]) == []
    assert probe_levels([0.1]) == [0.15]
    assert probe_levels([0.12, 0.29]) == [0.15, 0.30]
    assert probe_levels([0.31]) == [0.15, 0.30, 0.45]
    assert probe_levels([0.9]) == [0.15, 0.30, 0.45, 0.60]  # competitive() never asks past 60%
    assert recovery_levels([0.15, 0.30, 0.45], [0.12, 0.29, 0.40]) == (0.15, 0.45)
    assert recovery_levels([0.15, 0.30], [0.26, 0.29]) == (0.30,)
    assert recovery_levels([], [0.1]) == ()


def test_the_probe_stops_once_the_measured_change_rules_out_the_rest():
    reference, deltas, bar = 10.0, {"F16": 0.0, "Q8_0": 0.01}, 0.05  # a dense type at 0.05 fits
    comp = {"Q8_0": 0.05, "F16": 0.55}  # F16 must lose 55% to fit
    logged = []
    stop = probe_stop(comp, deltas, bar, reference, recoveries=0, log=logged.append)
    # 15% removed costs log 1.5 = 0.405 > 0.05: F16, needing more, cannot win; Q8_0 needs no more.
    assert stop([(0.15, 0.15, 15.0)], [])
    assert "stopped at 15%: F16" in logged[0]
    assert ruled_out(comp, deltas, bar, 0.15, math.log(1.5), 0.0) == {"F16"}
    # A level that costs almost nothing rules nothing out: go on to the level F16 needs.
    assert not probe_stop(comp, deltas, bar, reference, 0)([(0.15, 0.15, 10.1)], [])
    # With recovery asked and not yet measured there is no bound; once measured, there is.
    assert ruled_out(comp, deltas, bar, 0.15, math.log(1.5), None) == set()
    assert not probe_stop(comp, deltas, bar, reference, 1)([(0.15, 0.15, 15.0)], [])
    assert probe_stop(comp, deltas, bar, reference, 1)([(0.15, 0.15, 15.0)], [(0.15, 12.0)])
    assert ruled_out(comp, deltas, bar, 0.15, math.log(1.5), 0.95) == set()  # recovery closes 95%
    # F16 is ruled out, but Q6_K, which could still win, needs 25%: the probe goes on to 30%.
    wider = {"Q6_K": 0.25, "F16": 0.55}
    go_on = probe_stop(wider, {"F16": 0.0, "Q6_K": -0.5}, bar, reference, 0)
    assert ruled_out(wider, {"F16": 0.0, "Q6_K": -0.5}, bar, 0.15, math.log(1.5), 0.0) == {"F16"}
    assert not go_on([(0.15, 0.15, 15.0)], [])
    assert go_on([(0.15, 0.15, 15.0), (0.30, 0.30, 16.0)], [])  # Q6_K covered, F16 ruled out


# --- the choice on the tiny model, with a closed-form cost and injected quality ----------------

@pytest.fixture(scope="module")
def measured(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    ids = sample_windows(tokenize(loaded.tokenizer, corpus("builtin")), 4, 64, 0, "builtin")
    return loaded, measure(LayerStream(loaded.model, loaded.spec, ids), loaded.spec, loaded.shape, 5.0)


def _pricings(shape):
    calib = Calibration(0.0, 1e9, 0.0, 1e10, 0.0, 1.0, "measured")
    return {t: Pricing(shape, Format("onnx", t), calib, 64) for t in TYPES}


def _searches(measured, budget_of):
    loaded, m = measured
    pricings = _pricings(loaded.shape)
    dense = {t: p.cost([loaded.shape.dense_dims] * loaded.shape.n_layers).memory_bytes
             for t, p in pricings.items()}
    budgets = Budgets(int(budget_of(dense)), 64, None, None)
    settings = PruneSettings(sparsity=0.0)
    return type_searches(loaded.shape, loaded.source, m, settings, budgets, pricings,
                         {t: 1 for t in TYPES}, 0.0), dense, budgets


def test_types_at_one_alignment_share_their_plans(measured):
    """A plan depends on the removal and the alignment, not on the type: the searches of types
    at one alignment make each plan once."""
    searches, _, _ = _searches(measured, lambda d: (d["fp16"] + d["fp32"]) / 2)
    plans = {t: {c.target: c.plan for c in s.priced} for t, s in searches.items()}
    shared = set(plans["fp32"]) & set(plans["fp16"])
    assert 0.0 in shared and all(plans["fp32"][t] is plans["fp16"][t] for t in shared)


def test_a_dense_type_that_fits_and_beats_pruning_is_chosen(measured):
    # Room for dense fp16, not for dense fp32: fp32 must prune about half to fit.
    searches, dense, _ = _searches(measured, lambda d: (d["fp16"] + d["fp32"]) / 2)
    assert searches["fp16"].chosen.target == 0 and searches["int8"].chosen.target == 0
    assert searches["fp32"].chosen.target > 0
    deltas = {"fp32": 0.0, "fp16": 0.001, "int8": 0.02}
    assert set(competitive(searches, deltas)) == {"fp32"}  # only fp32's quantization costs less
    q = QualityModel(10.0, deltas, ((0.45, 0.5), (0.6, 0.8)))
    chosen, why = choose(options(searches, q, recover=False))
    assert (chosen.type, chosen.removed) == ("fp16", 0.0)
    assert "without pruning and is predicted better than every pruned candidate" in why
    # A probe stopped at 15% (its change ruled fp32 out): fp32's plans have no prediction.
    stopped = QualityModel(10.0, deltas, ((0.15, 0.4),))
    chosen, why = choose(options(searches, stopped, recover=False), stopped)
    assert (chosen.type, chosen.removed) == ("fp16", 0.0)
    assert why.endswith("fp32 would fit only with more removal than the structural probe reached: "
                        "15% removed already costs +49% perplexity")
    # fp32's least removal predicted (and beaten): no such clause, though its 80% plan is not.
    chosen, why = choose(options(searches, q, recover=False), q)
    assert any(o.type == "fp32" and o.removed > 0.7 and o.delta is None
               for o in options(searches, q, recover=False))
    assert chosen.type == "fp16" and "would fit only" not in why


def test_a_pruned_plan_wins_when_structure_costs_less_than_quantization(measured):
    searches, _, _ = _searches(measured, lambda d: (d["fp16"] + d["fp32"]) / 2)
    deltas = {"fp32": 0.0, "fp16": 0.3, "int8": 0.9}  # a type that costs a lot (injected)
    q = QualityModel(10.0, deltas, ((0.45, 0.1), (0.6, 0.2)), recovered_share=((0.3, 0.5),))
    chosen, why = choose(options(searches, q, recover=False))
    assert chosen.type == "fp32" and chosen.removed > 0 and not chosen.recovered
    assert "against the best dense type that meets the budgets, dense fp16" in why
    chosen, _ = choose(options(searches, q, recover=True))
    assert chosen.type == "fp32" and chosen.recovered  # recovery halves the structural change


def test_ties_go_to_the_faster_candidate(measured):
    searches, _, _ = _searches(measured, lambda d: d["fp32"] * 2)  # everything fits dense
    opts = options(searches, QualityModel(10.0, {t: 0.0 for t in TYPES}), recover=False)
    chosen, _ = choose(opts)
    speed = {o.type: o.candidate.cost.decode_tokens_per_s for o in opts}
    assert len(set(speed.values())) == 3 and chosen.type == max(speed, key=speed.get)


def test_nothing_fits(measured):
    searches, _, _ = _searches(measured, lambda d: 10)
    assert all(isinstance(s, str) and "cannot be met" in s for s in searches.values())
    with pytest.raises(UserError, match="no candidate"):
        choose(options(searches, QualityModel(10.0, {t: 0.0 for t in TYPES}), recover=False))


def test_no_budget_at_all_is_an_error_not_an_infeasible_type(measured):
    loaded, m = measured
    with pytest.raises(UserError, match="no budget to search for"):
        type_searches(loaded.shape, loaded.source, m, PruneSettings(sparsity=0.0),
                      Budgets(None, 64, None, None), _pricings(loaded.shape), {t: 1 for t in TYPES}, 0.0)


def test_a_plan_priced_at_two_targets_is_one_candidate(measured):
    searches, _, _ = _searches(measured, lambda d: (d["fp16"] + d["fp32"]) / 2)
    s = searches["fp32"]
    twice = replace(s, priced=[s.chosen, replace(s.chosen, target=s.chosen.target + 0.01)])
    q = QualityModel(10.0, {"fp32": 0.0}, ((0.45, 0.5), (0.6, 0.8)), recovered_share=((0.3, 0.5),))
    opts = options({"fp32": twice}, q, recover=True)
    assert [(o.candidate.target, o.recovered) for o in opts] == [(s.chosen.target, False),
                                                                 (s.chosen.target, True)]
    assert opts[0].removed == s.chosen.plan.removed() > 0


def test_a_type_detect_did_not_measure_borrows_the_terms_of_one_it_did():
    from mosaic_export.decide.profile import load_profile

    profile = load_profile("laptop-cpu")
    assert profile.calibration_near(Format("gguf", "Q8_0")).basis == "nominal"  # nothing measured
    measured = Calibration(0.001, 2e10, 0.01, 5e10, 1e8, 1.1, "measured")
    local = replace(profile, calibration={"gguf:Q8_0": measured})
    assert local.calibration_near(Format("gguf", "Q8_0")) is measured
    near = local.calibration_near(Format("gguf", "Q4_K_M"))
    assert near.basis == "transferred from gguf:Q8_0" and near.bandwidth == measured.bandwidth
    assert local.calibration_near(Format("onnx", "int8")).basis == "nominal"  # another target


# --- the command -------------------------------------------------------------------------------

def test_main_command_searches_types_and_reports_the_front(tiny_model_dir, profile, tmp_path, capsys):
    loaded = load_model(str(tiny_model_dir))
    pricings = _pricings(loaded.shape)
    size = {t: p.cost([loaded.shape.dense_dims] * loaded.shape.n_layers).memory_bytes
            for t, p in pricings.items()}
    budget = int((size["fp16"] + size["fp32"]) / 2)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--types", "fp32",
                 "fp16", "--max-memory", f"{budget}B", "--margin", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "joint search over fp32, fp16" in printed
    report = json.loads((out / "report.json").read_text())
    joint = report["joint"]
    assert set(joint["quality"]["type_deltas"]) == {"fp32", "fp16"}
    assert joint["quality"]["type_deltas"]["fp32"] == pytest.approx(0.0, abs=1e-3)  # ORT fp32 = torch
    chosen = joint["chosen"]
    assert report["cost"]["format"] == f"onnx:{chosen['type']}"
    assert (out / f"onnx-{chosen['type']}").is_dir()
    if chosen["type"] == "fp16":  # fits dense: nothing pruned
        assert chosen["removed"] == 0 and "without pruning" in joint["reason"]
    m = joint["measured"]
    assert m["predicted_perplexity"] > 0 and m["log_error"] == pytest.approx(
        abs(math.log(m["predicted_perplexity"] / m["measured_perplexity"])))
    text = (out / "report.md").read_text()
    assert "## Joint search" in text and "| dense fp16 |" in text
    assert (out / "front.png").stat().st_size > 0
    assert report["format"] == {"target": "onnx", "type": chosen["type"]}
    assert report["timing"]["joint_s"] > 0 and "joint search wall time" in text


def test_joint_search_probes_structure_where_pruning_can_win(tiny_model_dir, profile, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    size = {t: p.cost([loaded.shape.dense_dims] * loaded.shape.n_layers).memory_bytes
            for t, p in _pricings(loaded.shape).items()}
    out = tmp_path / "out"
    # Only fp32 offered, below its dense size: pruning is the only way, and must be probed.
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--types", "fp32",
                 "--max-memory", f"{int(size['fp32'] * 0.8)}B", "--margin", "0", "--out", str(out)]) == 0
    joint = json.loads((out / "report.json").read_text())["joint"]
    assert joint["chosen"]["removed"] > 0 and joint["quality"]["structure"]
    # The probe reached the chosen removal (or within OVERSHOOT of it, where the prediction holds).
    assert joint["quality"]["structure"][-1][0] + OVERSHOOT >= joint["chosen"]["removed"]


@pytest.mark.parametrize("args, message", [
    (["--types", "fp32", "--dtype", "fp16"], "--types and --dtype both choose the type"),
    (["--types", "Q8_0"], "--types: Q8_0 not offered by the onnx target"),
    (["--types", "fp32", "--sparsity", "0.2"], "--types is for a budget search"),
])
def test_bad_types_fail_at_the_door(tiny_model_dir, profile, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--max-memory",
                 "1GiB", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_sweep_over_types(tiny_model_dir, profile, tmp_path):
    import csv

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_model_dir), "--profile", str(profile), *FAST,
                 "--types", "fp32", "int8", "--targets", "0", "0.3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["type"], float(r["target"])) for r in rows] == [
        ("fp32", 0.0), ("fp32", 0.3), ("int8", 0.0), ("int8", 0.3)]
    assert float(rows[2]["file_bytes"]) < float(rows[0]["file_bytes"])
    assert (out / "int8-r0.30").is_dir() and "| int8 |" in (out / "report.md").read_text()


def test_an_unmeasured_type_is_anchored_at_its_dense_run(measured):
    from mosaic_export.decide.costmodel import anchored

    loaded, _ = measured
    pricing = _pricings(loaded.shape)["int8"]
    dims = [loaded.shape.dense_dims] * loaded.shape.n_layers
    run = {"peak_rss_bytes": 5_000_000, "decode": {"tokens_per_s": 400.0},
           "prefill": {"tokens_per_s": 3000.0}}
    calib = anchored(pricing, dims, run)
    cost = Pricing(pricing.shape, pricing.fmt, calib, pricing.context).cost(dims)
    assert cost.memory_bytes == pytest.approx(5_000_000)
    assert cost.decode_tokens_per_s == pytest.approx(400.0)
    assert cost.prefill_tokens_per_s == pytest.approx(3000.0)
    assert calib.basis == "measured, anchored at the dense int8 run"
    smaller = [type(dims[0])(n_head=dims[0].n_head, n_kv=dims[0].n_kv, n_ff=dims[0].n_ff // 2)] * len(dims)
    assert Pricing(pricing.shape, pricing.fmt, calib, pricing.context).cost(smaller).memory_bytes < 5_000_000
