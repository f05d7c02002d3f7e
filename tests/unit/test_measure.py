"""Measurement as statistics (mosaic_export/measure/, verdict.py), with injected timing series and
a fake clock: no real timing in any of these tests."""

from __future__ import annotations

import json
import random

import pytest
from scipy.stats import binom

from mosaic_export.decide.profile import Budgets
from mosaic_export.decide.verdict import MISSED_EXIT, outcome, verdicts
from mosaic_export.measure.rounds import Policy, interleaved
from mosaic_export.measure.stats import (
    MET,
    MISSED,
    UNDECIDED,
    Interval,
    judge,
    least_values,
    median_interval,
    order_ranks,
)


def result(decode: float, prefill: float = 500.0, memory: float = 4e8) -> dict:
    """A runtime benchmark's result with these figures (512-token prompt)."""
    return {"decode": {"tokens_per_s": decode}, "prefill": {"tokens_per_s": prefill, "tokens": 512,
                                                             "seconds": 512 / prefill},
            "peak_rss_bytes": memory, "context": 2048}


class Clock:
    """A fake clock: each run advances it by ``step`` seconds."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now


def series(values, clock: Clock, order: list | None = None, name: str = ""):
    """A candidate whose runs give ``values`` in turn (decode tokens/s or whole results)."""
    it = iter(values)

    def run(r: int) -> dict:
        clock.now += clock.step
        if order is not None:
            order.append(name)
        v = next(it)
        return v if isinstance(v, dict) else result(v)

    return run


# --- the interval ------------------------------------------------------------------------------


def test_order_statistic_ranks_against_the_binomial_distribution():
    """[x(k), x(n+1-k)] covers the median with 1 - 2 P(B <= k-1): checked against scipy."""
    for n in (6, 10, 20, 41):
        k, reached = order_ranks(n, 0.95)
        assert reached == pytest.approx(1 - 2 * binom.cdf(k - 1, n, 0.5))
        assert reached >= 0.95
        assert 1 - 2 * binom.cdf(k, n, 0.5) < 0.95  # the next rank inward would not reach it
    assert order_ranks(10, 0.95)[0] == 2 and order_ranks(20, 0.95)[0] == 6
    assert least_values(0.95) == 6 and least_values(0.9) == 5
    k, reached = order_ranks(5, 0.95)  # too few values: [min, max], 94%
    assert k == 1 and reached == pytest.approx(1 - 2 / 32)


def test_median_interval_of_known_values():
    iv = median_interval([10.0, 12.0, 11.0, 9.0, 13.0, 10.5, 11.5, 12.5, 9.5, 30.0])
    assert iv.median == pytest.approx(11.25)
    assert (iv.low, iv.high) == (9.5, 13.0)  # ranks 2 and 9: the burst at 30 is outside
    assert iv.n == 10 and iv.confidence == pytest.approx(1 - 2 * binom.cdf(1, 10, 0.5))
    assert iv.half_width == pytest.approx((13.0 - 9.5) / 2 / 11.25)
    assert median_interval([5.0]).confidence == 0.0


def test_intervals_cover_the_true_median_as_promised():
    """On a skewed noise model like a shared machine's (most runs close, some slowed a lot), the
    95% interval of 10 runs covers the true median in at least 95% of 4,000 trials."""
    rng = random.Random(0)
    def run() -> float:  # 50%: at most 100 (uniform 50-100); 50%: 100-150: the median is 100
        return rng.uniform(50, 100) if rng.random() < 0.5 else rng.uniform(100, 150)

    true_median = 100.0
    covered = sum(iv.low <= true_median <= iv.high
                  for iv in (median_interval([run() for _ in range(10)]) for _ in range(4000)))
    assert covered / 4000 >= 0.95


# --- rounds: convergence, the time cap, ratios ----------------------------------------------------


def test_rounds_take_turns_in_alternating_order():
    clock, order = Clock(1.0), []
    runs = {k: series([100.0] * 10, clock, order, k) for k in ("a", "b")}
    interleaved(runs, Policy(least=3, max_seconds=1e9, most=3), clock=clock)
    assert order == ["a", "b", "b", "a", "a", "b"]


def test_rounds_stop_once_every_interval_is_narrow():
    """Steady figures: the interval is within 5% as soon as it has its full confidence (6 rounds)."""
    clock = Clock(1.0)
    steady = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2] + [100.0] * 20
    m = interleaved({"a": series(steady, clock)}, Policy(least=3, max_seconds=1e9), clock=clock)
    assert m.stopped == "precise" and m.rounds == 6
    assert m.figure("a", "decode").half_width <= 0.05


def test_interval_converges_as_rounds_go_on():
    """Noisy figures (+-10%): the interval narrows as rounds are added; the rounds stop at the
    first round where it is within 5%."""
    rng = random.Random(1)
    noisy = [100.0 * rng.uniform(0.9, 1.1) for _ in range(40)]
    clock = Clock(1.0)
    m = interleaved({"a": series(noisy, clock)}, Policy(least=3, max_seconds=1e9), clock=clock)
    assert m.stopped == "precise"
    widths = [median_interval(noisy[:n]).half_width for n in range(6, m.rounds + 1)]
    assert widths[-1] <= 0.05 < max(widths[:-1])  # it stopped at the first narrow enough
    assert widths[0] > 0.05 and m.rounds > 6  # six runs of +-10% noise give a wide interval


def test_the_time_cap_stops_the_rounds():
    """Runs of 10 s, a cap of 45 s: 3 rounds (least), then a fourth that would end at 40 s, not a
    fifth (it would end at 50 s)."""
    clock = Clock(10.0)
    noisy = [100.0, 70.0, 130.0, 90.0, 110.0, 60.0, 140.0]
    m = interleaved({"a": series(noisy, clock)}, Policy(least=3, max_seconds=45.0), clock=clock)
    assert m.stopped == "time cap" and m.rounds == 4 and m.seconds == pytest.approx(40.0)
    clock = Clock(100.0)  # the least rounds are run even past the cap
    m = interleaved({"a": series(noisy, clock)}, Policy(least=3, max_seconds=45.0), clock=clock)
    assert m.rounds == 3


def test_ratios_against_the_reference_cancel_a_common_slowdown():
    """Each round both runs are slowed alike (a busy neighbour, 0.6x to 1.0x); the candidate is
    1.2x the reference. Each figure's interval is wide, the ratio's is tight, and the relative
    budget (1.1x) is met while the absolute one it stands for cannot be decided."""
    rng = random.Random(2)
    slow = [rng.uniform(0.6, 1.0) for _ in range(8)]
    clock = Clock(1.0)
    runs = {"plan": series([120.0 * s for s in slow], clock),
            "dense": series([100.0 * s for s in slow], clock)}
    m = interleaved(runs, Policy(least=8, most=8, max_seconds=1e9), "dense", clock=clock)
    assert m.figure("plan", "decode").half_width > 0.1
    ratio = m.ratio("plan", "decode")
    assert ratio.low == pytest.approx(1.2) and ratio.high == pytest.approx(1.2)
    relative = Budgets(None, 2048, 88.0, None, relative={"min_tokens_per_s": 1.1})
    (v,) = verdicts(relative, m, "plan")
    assert v.status == MET and v.ratio is not None
    absolute = Budgets(None, 2048, 88.0, None)
    (v,) = verdicts(absolute, m, "plan")
    assert v.status == UNDECIDED and v.ratio is None


# --- verdicts and the exit status -------------------------------------------------------------------


def test_judge_met_missed_undecided():
    iv = Interval(100.0, 95.0, 105.0, 8, 0.93)
    assert judge(iv, 90.0, at_most=False) == MET
    assert judge(iv, 110.0, at_most=False) == MISSED
    assert judge(iv, 100.0, at_most=False) == UNDECIDED  # straddles
    assert judge(iv, 110.0, at_most=True) == MET and judge(iv, 90.0, at_most=True) == MISSED
    few = Interval(100.0, 95.0, 105.0, 4, 0.875)  # 4 runs: too little confidence to decide
    assert judge(few, 90.0, at_most=False) == UNDECIDED


def test_a_miss_exits_with_its_own_status_and_names_the_budget(capsys):
    from mosaic_export.cli import verdict_exit

    clock = Clock(1.0)
    m = interleaved({"plan": series([120.0, 121.0, 119.0, 120.5, 119.5, 120.2], clock)},
                    Policy(least=6, most=6, max_seconds=1e9), clock=clock)
    missed = [v.to_dict() for v in verdicts(Budgets(None, 2048, 131.2, None), m, "plan")]
    met = [v.to_dict() for v in verdicts(Budgets(None, 2048, 110.0, None), m, "plan")]
    straddled = [v.to_dict() for v in verdicts(Budgets(None, 2048, 120.0, None), m, "plan")]
    assert outcome(missed)[0] == MISSED_EXIT == 3
    assert outcome(met) == (0, None)
    code, line = outcome(straddled)
    assert code == 0 and line.startswith("undecided") and "decode >= 120.0 tokens/s" in line

    def report(v, local=True):
        return {"cost": {"profile_local": local, "measured": {"verdicts": v}}}

    assert verdict_exit(report(missed)) == 3
    err = capsys.readouterr().err
    assert err.startswith("mosaic-export: budget missed beyond its interval: decode >= 131.2 tokens/s")
    assert verdict_exit(report(missed, local=False)) == 0  # measured here, but not on the profile's device
    assert verdict_exit(report(straddled)) == 0
    assert "undecided" in capsys.readouterr().out


def test_memory_from_the_filled_rounds_speed_from_every_round():
    """Rounds after the first ones time prefill and decode only (the cache not filled): their
    peak memory is no figure, their speed is; ratios pair only rounds that measured both."""
    clock = Clock(1.0)

    def plan(decodes, memories):
        return series([dict(result(d, memory=mem), filled=mem is not None)
                       for d, mem in zip(decodes, memories, strict=True)], clock)

    runs = {"plan": plan([120, 121, 119, 122, 118, 120], [4e8, 4e8, None, None, None, None]),
            "dense": plan([100, 101, 99, 102, 98, 100], [5e8, 5e8, None, None, None, None])}
    m = interleaved(runs, Policy(least=6, most=6, max_seconds=1e9), "dense", clock=clock)
    assert m.figure("plan", "decode").n == 6 and m.figure("plan", "memory").n == 2
    assert m.ratio("plan", "memory").n == 2 and m.ratio("plan", "memory").median == pytest.approx(0.8)
    assert m.to_dict("plan")["memory_rounds"] == 2


def test_benchmarks_fill_the_context_in_the_least_rounds_only(monkeypatch, tmp_path):
    """benchmarks.measure: the policy's least rounds fill the KV cache (memory), later ones time
    prefill and decode only; the first round also scores perplexity when asked."""
    from mosaic_export.decide import benchmarks
    from mosaic_export.decide.costmodel import Format
    from mosaic_export.targets.base import Evaluation
    from mosaic_export.targets.gguf import target as gguf_target

    calls = []

    def benchmark(self, path, **options):
        calls.append(options)
        return dict(result(100.0), filled=not options["no_fill"])

    monkeypatch.setattr(gguf_target.GGUF, "benchmark", benchmark)
    fmt = Format("gguf", "Q8_0")
    m = benchmarks.measure({"a": (fmt, tmp_path / "a.gguf")}, Policy(least=2, most=4, max_seconds=1e9),
                           2048, first=Evaluation("builtin-heldout", 4))
    assert m.rounds == 4  # steady figures, but 4 rounds are too few for a 95% interval: the most
    assert [c["no_fill"] for c in calls] == [False, False, True, True]
    assert all(c["context"] == 2048 for c in calls)
    assert calls[0]["eval_windows"] == 4 and all(c["eval_windows"] == 0 for c in calls[1:])


def test_rounds_stop_when_precise_though_memory_was_measured_in_the_first_rounds_only():
    """Memory measured in 2 filled rounds (a 50% interval that cannot grow) does not keep the
    rounds going: once the speed figures are within 5% at 95%, they stop."""
    clock = Clock(1.0)
    results = [dict(result(100.0 + (i % 3) * 0.5, memory=4e8), filled=i < 2) for i in range(20)]
    m = interleaved({"a": series(results, clock)}, Policy(least=2, max_seconds=1e9), clock=clock)
    assert m.stopped == "precise" and m.rounds == 6
    assert m.figure("a", "memory").n == 2


def test_the_built_model_is_measured_beside_the_reference_its_budgets_need(monkeypatch, tmp_path):
    """pipeline.measure_built: a relative budget brings the dense model in the profile's format
    (exported before pruning) as the reference; a build that is that model is its own reference;
    without a relative budget, no reference; --check-neighbour adds the neighbour plan."""
    from types import SimpleNamespace

    from mosaic_export.decide.costmodel import Format
    from mosaic_export.run import beside, pipeline
    from mosaic_export.targets.base import Evaluation

    calls = []
    monkeypatch.setattr(beside, "measure_beside", lambda *a: calls.append(a) or a)
    q8, q6 = Format("gguf", "Q8_0"), Format("gguf", "Q6_K")
    reference = tmp_path / "dense.gguf"

    def built(relative: bool, fmt: Format, pruned: bool, neighbour: bool = False):
        profile = SimpleNamespace(budgets=Budgets(None, 2048, 110.0, None,
                                                  relative={"min_tokens_per_s": 1.1} if relative else {}),
                                  runtime=None)
        dense = SimpleNamespace(profile=profile, pricing=SimpleNamespace(fmt=q8), reference=reference)
        plan = SimpleNamespace(params=lambda: {"decoder_dense": 100})
        found = SimpleNamespace(neighbour=SimpleNamespace(plan="neighbour plan")) if neighbour else None
        done = SimpleNamespace(found=found, fmt=fmt, plan=plan, counts={"decoder": 70 if pruned else 100})
        config = SimpleNamespace(check_neighbour=neighbour)
        pipeline.measure_built(config, dense, done, tmp_path / "built", Evaluation(None, 0, context=2048))
        return calls[-1]

    _, (fmt, _), others, ref, context, *_ = built(True, q6, True)
    assert fmt == q6 and others == {"dense": (q8, reference)} and ref == "dense" and context == 2048
    _, _, others, ref, *_ = built(True, q8, False)  # the dense Q8_0 itself: its own reference
    assert others == {} and ref == "plan"
    _, _, others, ref, *_ = built(True, q6, False)  # dense, but another type than the budgets'
    assert set(others) == {"dense"} and ref == "dense"
    _, _, others, ref, *_ = built(False, q6, True, neighbour=True)
    assert others == {"neighbour": (q6, "neighbour plan")} and ref is None


def test_a_measured_miss_exits_3_and_the_folder_is_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The main command on a profile of this machine whose build misses a budget beyond its
    interval (the rounds canned: the built model at 40 tokens/s in every round): exit 3, OUT
    written with the verdict in report.json and report.md, the miss named in the last line."""
    from mosaic_export.cli import main
    from mosaic_export.run import pipeline
    from tests.unit.test_budgets import FAST, PROFILE

    clock = Clock(1.0)
    canned = interleaved({"plan": series([40.0, 40.5, 39.5, 40.2, 39.8], clock)},
                         Policy(least=5, most=5, max_seconds=1e9), clock=clock)
    for r in canned.runs["plan"]:
        r.update(file_bytes=1000, context=64)
    canned.runs["plan"][0]["perplexity"] = {"perplexity": 300.0, "text": "builtin-heldout",
                                            "n_predicted": 126, "n_windows": 2}
    monkeypatch.setattr(pipeline, "measure_built", lambda *a, **k: canned)
    profile = tmp_path / "tiny.toml"
    profile.write_text(PROFILE.replace('name = "tiny-device"', 'name = "tiny-device"\nlocal = true'))
    out = tmp_path / "out"
    code = main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--sparsity", "0.2",
                 "--structured-fraction", "1", "--min-tokens-per-s", "100", "--out", str(out)])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("mosaic-export: budget missed beyond its interval: decode >= 100.0 tokens/s: "
                       "40.0 tokens/s [39.5 tokens/s, 40.5 tokens/s]: missed")
    report = json.loads((out / "report.json").read_text())
    (v,) = report["cost"]["measured"]["verdicts"]
    assert v["status"] == "missed" and v["figure"]["n"] == 5
    assert "MISSED" in (out / "report.md").read_text() and (out / "manifest.json").is_file()
