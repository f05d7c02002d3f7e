"""profile detect's trust checks: repeated runs and their spread, implausible figures, a busy
machine, and the refusal to write untrustworthy figures without --force. No runtime is run: the
benchmarks are canned."""

from __future__ import annotations

from pathlib import Path

import pytest

from mosaic_export import detect
from mosaic_export.cli import main
from mosaic_export.profile import load_profile
from mosaic_export.trust import (
    CpuTimes,
    WidthRuns,
    busy_reasons,
    cpu_shares,
    parse_cpu_line,
    read_cpu_times,
    sanity_problems,
    settled,
    spread,
)

# The issue: llama.cpp Q8_0 decode on a busy 2-core VM, smaller measured slower.
ISSUE = [WidthRuns(1.0, (24.9,), (300.0,)), WidthRuns(0.7, (9.8,), (400.0,)),
         WidthRuns(0.4, (10.4,), (600.0,))]


def test_spread_is_the_range_over_the_median():
    assert spread([10.0, 12.0, 11.0]) == pytest.approx(2 / 11)
    assert spread([24.9, 12.0, 24.0]) == pytest.approx(12.9 / 24.0)
    assert spread([7.0]) == 0.0 and spread([]) == 0.0


def test_runs_settle_when_the_two_fastest_agree():
    assert settled([20.0, 10.0, 19.5])  # 2.5% apart; the slow run does not matter
    assert not settled([20.0, 18.0, 10.0])  # 10% apart
    assert not settled([20.0])


def test_sanity_flags_the_issues_figures():
    problems = sanity_problems(ISSUE, "gguf:Q8_0")
    decode = [p for p in problems if " decode " in p]
    assert len(decode) == 2, problems  # 0.7 and 0.4 against 1.0; 0.4 against 0.7 is fine
    assert any("width 0.7 (9.8 tokens/s) is slower than at width 1.0 (24.9 tokens/s)" in p
               for p in decode)
    assert any("width 0.4 (10.4 tokens/s) is slower than at width 1.0 (24.9 tokens/s)" in p
               for p in decode)
    assert all(p.startswith("gguf:Q8_0 ") for p in problems)
    assert not [p for p in problems if "prefill" in p]  # prefill was monotone


def test_sanity_passes_a_monotone_set_within_the_tolerance():
    runs = [WidthRuns(1.0, (24.9, 24.5, 24.0), (300.0, 290.0, 295.0)),
            WidthRuns(0.7, (31.0, 30.2, 30.8), (410.0, 400.0, 405.0)),
            WidthRuns(0.4, (30.0, 29.8, 29.9), (640.0, 600.0, 620.0))]  # 3% under 0.7: noise
    assert sanity_problems(runs) == []


def test_sanity_flags_unstable_runs_and_slower_prefill():
    runs = [WidthRuns(1.0, (24.9, 12.0, 11.9), (300.0, 300.0, 300.0)),
            WidthRuns(0.7, (31.0, 30.5, 30.8), (250.0, 240.0, 245.0))]
    problems = sanity_problems(runs)
    assert any("decode at width 1.0: the two fastest runs differ by 52% (24.9, 12.0, 11.9 tokens/s; "
               "limit 10%)" in p for p in problems), problems
    assert any("prefill at width 0.7 (250 tokens/s) is slower than at width 1.0 (300 tokens/s)" in p
               for p in problems), problems
    assert len(problems) == 2


def test_busy_reasons_from_other_processes_steal_and_load():
    assert busy_reasons("while measuring", 0.05, 0.01, 1.2, 2) == []
    (others,) = busy_reasons("while measuring", 0.40, 0.0, 2.6, 2)
    assert "other processes took 40% of the CPU time while measuring (limit 25%" in others
    assert "load average 2.60 on 2 CPUs" in others
    (steal,) = busy_reasons("before measuring", 0.0, 0.08)
    assert "took 8% of the CPU time before measuring (steal; limit 5%)" in steal
    assert len(busy_reasons("while measuring", 0.5, 0.2)) == 2
    # No /proc/stat: the load average less this process, per CPU.
    (load,) = busy_reasons("before measuring", None, None, 2.5, 2)  # (2.5 - 1) / 2 = 0.75
    assert "load average 2.50 on 2 CPUs" in load
    assert busy_reasons("before measuring", None, None, 1.8, 2) == []  # 0.4 per CPU
    assert busy_reasons("before measuring", None, None, None, None) == []


def test_cpu_shares_leave_out_this_process():
    before = CpuTimes(total=1000, busy=100, steal=10, own=50)
    # 1000 ticks pass: 600 busy, of which 500 this process's; 30 stolen.
    after = CpuTimes(total=2000, busy=700, steal=40, own=550)
    others, steal = cpu_shares(before, after)
    assert others == pytest.approx(0.1) and steal == pytest.approx(0.03)
    assert cpu_shares(before, before) == (0.0, 0.0)


def test_proc_stat_cpu_line(tmp_path):
    line = "cpu  27965 0 4531 24475 281 0 56 45 0 0"
    total, busy, steal = parse_cpu_line(line)
    assert (total, busy, steal) == (27965 + 4531 + 24475 + 281 + 56 + 45, 27965 + 4531 + 56, 45)
    assert parse_cpu_line("cpu  10 0 5 100 1 0 0")[2] == 0  # an old kernel: no steal figure
    stat = tmp_path / "stat"
    stat.write_text(line + "\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    now = read_cpu_times(str(stat))
    assert now is not None and now.steal == 45 and now.own > 0
    assert read_cpu_times(str(tmp_path / "missing")) is None


def test_interleaved_rounds_take_turns():
    """Every size once per round, in turn; a size stops once settled after the least rounds."""
    order = []
    figures = {"a": iter([20.0, 19.8, 19.9, 1.0, 1.0]), "b": iter([10.0, 20.0, 15.0, 19.5, 5.0])}

    def run(key):
        def go():
            order.append(key)
            return {"decode": {"tokens_per_s": next(figures[key])}, "prefill": {"tokens_per_s": 100.0}}
        return go

    out = detect.interleaved_rounds({"a": run("a"), "b": run("b")}, least=3, most=5)
    assert order == ["a", "b", "a", "b", "a", "b", "b"]
    assert [r["decode"]["tokens_per_s"] for r in out["b"]] == [10.0, 20.0, 15.0, 19.5]


def test_interleaved_rounds_wait_for_prefill_too():
    """Decode settled after three rounds, prefill not (its two fastest 10% apart): more rounds
    until prefill's two fastest agree as well; both are fitted and both are judged."""
    prefills = iter([100.0, 90.0, 80.0, 99.0, 50.0])

    def go():
        return {"decode": {"tokens_per_s": 20.0}, "prefill": {"tokens_per_s": next(prefills)}}

    out = detect.interleaved_rounds({"a": go}, least=3, most=5)["a"]
    assert [r["prefill"]["tokens_per_s"] for r in out] == [100.0, 90.0, 80.0, 99.0]


def test_run_rounds_stops_when_settled(monkeypatch, tmp_path):
    """At least ROUNDS runs; then on until the two fastest decode (and prefill) figures agree,
    MAX_ROUNDS at most."""
    import mosaic_export.targets.onnx as onnx_target
    import mosaic_export.targets.onnx_runner as onnx_runner

    def runs_of(decodes):
        figures = iter(decodes)
        monkeypatch.setattr(onnx_target, "export", lambda loaded, path, dtype: path.mkdir())
        monkeypatch.setattr(onnx_runner, "benchmark", lambda path, **kw: {
            "decode": {"tokens_per_s": next(figures)}, "prefill": {"tokens_per_s": 100.0}})
        rs = detect.run_rounds(None, detect.Format("onnx", "fp32"), tmp_path, 64, None)
        assert not (tmp_path / "onnx-fp32").exists()  # the export is removed
        return [r["decode"]["tokens_per_s"] for r in rs]

    assert runs_of([20.0, 19.8, 19.9, 5.0, 5.0]) == [20.0, 19.8, 19.9]
    assert runs_of([10.0, 20.0, 15.0, 19.5, 5.0]) == [10.0, 20.0, 15.0, 19.5]
    assert runs_of([10.0, 20.0, 15.0, 17.0, 12.0, 99.0]) == [10.0, 20.0, 15.0, 17.0, 12.0]


def _canned(monkeypatch, widths: list[WidthRuns], busy: dict[str, list[str]] | None = None):
    """detect with canned benchmark runs (one WidthRuns per width, in WIDTHS order), canned
    device figures and machine checks (``busy``: reasons by "before"/"while")."""
    def interleaved_rounds(runs, least=3, most=5):
        out = {}
        for key, w in zip(runs, widths, strict=True):  # keys: (format, width) in WIDTHS order
            assert key[1] == w.width
            rss = 100e6 * (1 + w.width)
            out[key] = [{"decode": {"tokens_per_s": d}, "prefill": {"tokens_per_s": p},
                         "peak_rss_bytes": rss, "context": 64}
                        for d, p in zip(w.decode, w.prefill, strict=True)]
        return out

    busy = busy or {}
    monkeypatch.setattr(detect, "interleaved_rounds", interleaved_rounds)
    monkeypatch.setattr(detect, "memory_bandwidth", lambda: 10e9)
    monkeypatch.setattr(detect, "matmul_flops", lambda: 50e9)
    monkeypatch.setattr(detect, "QUIET_S", 0.0)
    monkeypatch.setattr(detect, "machine_check", lambda when, a, b: busy.get(when.split()[0], []))


def _detect(tiny_model_dir: Path, out: Path, *more: str) -> int:
    return main(["profile", "detect", "--model", str(tiny_model_dir), "--target", "onnx",
                 "--context", "64", "--out", str(out), *more])


def test_untrustworthy_figures_are_refused_without_force(tiny_model_dir, tmp_path, monkeypatch, capsys):
    issue = [WidthRuns(w.width, (w.decode[0], w.decode[0] * 0.98, w.decode[0] * 0.99),
                       (w.prefill[0],) * 3) for w in ISSUE]
    _canned(monkeypatch, issue)
    out = tmp_path / "me.toml"
    assert _detect(tiny_model_dir, out) == 2
    err = capsys.readouterr().err
    assert "warning: the measurements are not trustworthy:" in err
    assert "onnx:fp32 decode at width 0.7 (9.8 tokens/s) is slower than at width 1.0 (24.9 tokens/s)" in err
    assert ("error: profile detect: the measurements are not trustworthy (onnx:fp32 decode at width 0.7"
            in err)
    assert "and 1 more, listed above); rerun on an idle machine, or pass --force to write them anyway" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_force_writes_untrustworthy_figures_with_a_warning(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _canned(monkeypatch, ISSUE, busy={"while": ["other processes took 60% of the CPU time while measuring"]})
    out = tmp_path / "me.toml"
    assert _detect(tiny_model_dir, out, "--force") == 0
    err = capsys.readouterr().err
    assert "writing them anyway (--force)" in err and "other processes took 60%" in err
    text = out.read_text()
    assert "# WARNING: written with --force although the measurements are not trustworthy:" in text
    assert "# WARNING: - other processes took 60% of the CPU time while measuring" in text
    assert "# WARNING: - onnx:fp32 decode at width 0.7 (9.8 tokens/s) is slower" in text
    p = load_profile(str(out))  # the warning is comments: the file loads
    assert p.local and p.calibration_for(detect.Format("onnx", "fp32")).basis == "measured"


def test_busy_machine_is_refused_before_measuring(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _canned(monkeypatch, [])  # no run may be asked for
    monkeypatch.setattr(detect, "machine_check", lambda when, a, b: [
        f"the hypervisor took 9% of the CPU time {when} (steal; limit 5%)"])
    assert _detect(tiny_model_dir, tmp_path / "me.toml") == 2
    err = capsys.readouterr().err
    assert ("not trustworthy (the hypervisor took 9% of the CPU time before measuring (steal; limit 5%)); "
            "rerun on an idle machine" in err)
    assert list(tmp_path.iterdir()) == []


def test_trustworthy_figures_are_written_with_their_spread(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _canned(monkeypatch, [WidthRuns(1.0, (24.9, 24.0, 24.5), (300.0, 290.0, 280.0)),
                          WidthRuns(0.7, (31.0, 30.0, 30.8), (410.0, 400.0, 405.0)),
                          WidthRuns(0.4, (40.0, 39.5, 39.0), (600.0, 590.0, 595.0))])
    out = tmp_path / "me.toml"
    assert _detect(tiny_model_dir, out) == 0
    captured = capsys.readouterr()
    assert "not trustworthy" not in captured.err
    assert "decode 24.9 tokens/s, prefill 300 tokens/s (fastest of 3 runs; spread 4%, 7%)" in captured.out
    text = out.read_text()
    assert "WARNING" not in text
    assert "#   width 1.0, 3 runs: decode 24.9 / 24.5 / 3.7%, prefill 300 / 290 / 6.9%" in text
    assert "#   width 0.4, 3 runs: decode 40.0 / 39.5 / 2.5%" in text
    # fitted to the fastest of each width's runs
    assert "decode tokens/s 24.9, 31.0, 40.0" in text
    load_profile(str(out))
