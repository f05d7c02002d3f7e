"""profile detect: the widths measured in interleaved rounds (canned here: no runtime is run),
every figure written as a median with its interval and the number of rounds, a noisy or busy
machine warned about and never refused, figures no fit can use (a narrower model slower beyond
the intervals) refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from mosaic_export.cli import main
from mosaic_export.decide.costmodel import _line
from mosaic_export.decide.profile import load_profile
from mosaic_export.measure.rounds import interleaved
from mosaic_export.measure.trust import CpuTimes, busy_reasons, cpu_shares, parse_cpu_line, read_cpu_times
from mosaic_export.run import detect

pytestmark = pytest.mark.real_rounds  # detect's own rounds policy (3 at least), on a fake clock


def test_busy_reasons_from_other_processes_steal_and_load():
    assert busy_reasons("while measuring", 0.05, 0.01, 1.2, 2) == []
    (others,) = busy_reasons("while measuring", 0.40, 0.0, 2.6, 2)
    assert "other processes took 40% of the CPU time while measuring (over 25%" in others
    assert others.endswith("the intervals are wider for it")
    assert "load average 2.60 on 2 CPUs" in others
    (steal,) = busy_reasons("before measuring", 0.0, 0.08)
    assert "took 8% of the CPU time before measuring (steal, over 5%)" in steal
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


def _canned(monkeypatch, decodes: dict[float, list[float]], busy: dict[str, list[str]] | None = None,
            seconds: float = 10.0):
    """detect with canned rounds: each width's decode tokens/s round by round (prefill 10x, peak
    RSS by the width), canned device figures and machine checks (``busy``: reasons by
    "before"/"while"); each run takes ``seconds`` on a fake clock."""
    clock = [0.0]

    def measure(files, policy, context, threads=None, reference=None, first=None, log=None):
        def runner(width):
            values = iter(decodes[width])

            def run(r):
                clock[0] += seconds
                d = next(values)
                return {"decode": {"tokens_per_s": d},  # the context filled in the least rounds
                        "prefill": {"tokens_per_s": 10 * d, "tokens": 512, "seconds": 51.2 / d},
                        "peak_rss_bytes": 100e6 * (1 + width), "context": 64, "filled": r < policy.least}
            return run

        runs = {k: runner(float(k.split(" at ")[1])) for k in files}
        return interleaved(runs, policy, reference, clock=lambda: clock[0], log=log)

    busy = busy or {}
    monkeypatch.setattr(detect, "measure", measure)
    monkeypatch.setattr(detect, "memory_bandwidth", lambda: 10e9)
    monkeypatch.setattr(detect, "matmul_flops", lambda: 50e9)
    monkeypatch.setattr(detect, "QUIET_S", 0.0)
    monkeypatch.setattr(detect, "machine_check", lambda when, a, b: busy.get(when.split()[0], []))


def _detect(tiny_model_dir: Path, out: Path, *more: str) -> int:
    return main(["profile", "detect", "--model", str(tiny_model_dir), "--target", "onnx",
                 "--context", "64", "--out", str(out), *more])


# The runs: spreads of 15-40% between runs of one width on an idle machine.
NOISY = {1.0: [74.8, 101.0, 80.2, 88.8, 82.3, 95.0, 70.1, 99.0],
         0.7: [120.0, 150.0, 110.0, 141.0, 99.0, 130.0, 144.0, 105.0],
         0.4: [580.0, 945.0, 781.0, 772.0, 816.0, 700.0, 900.0, 640.0]}


def test_noisy_figures_are_written_with_intervals_never_refused(tiny_model_dir, tmp_path, monkeypatch,
                                                                 capsys):
    _canned(monkeypatch, NOISY)
    out = tmp_path / "me.toml"
    assert _detect(tiny_model_dir, out, "--measure-time", "150") == 0
    captured = capsys.readouterr()
    # 3 widths x 10 s a round: 3 rounds at least, then while the next round ends within 150 s
    # 75%: memory, measured in the 3 rounds that fill the context
    assert ("3 candidates measured in 5 rounds, 150 s (stopped: time cap); 10 of 15 intervals (75%) "
            "still wider than +-5%") in captured.out
    assert ("width 1.0 (4 heads, 96 channels), 5 rounds: decode 82.3 [74.8, 101] (94%) tokens/s, prefill "
            "823 [748, 1010] (94%) tokens/s, peak RSS 190.7 [190.7, 190.7] MiB (75%, 3 rounds) at 64 "
            "tokens") in captured.out
    (warning,) = [line for line in captured.err.splitlines() if "warning" in line]
    assert "after 5 rounds (150 s, the time cap)" in warning and "intervals are wider than +-5%" in warning
    text = out.read_text()
    assert "#   width 0.7 (2 heads, 67 channels), 5 rounds: decode 120 [99.0, 150] (94%) tokens/s" in text
    assert "# WARNING: after 5 rounds" in text
    assert "#   the fit at width 1.0: decode" in text
    p = load_profile(str(out))  # the figures and the warnings are comments: the file loads
    assert p.local and p.calibration_for(detect.Format("onnx", "fp32")).basis == "measured"


def test_a_narrower_model_slower_beyond_the_intervals_is_refused(tiny_model_dir, tmp_path, monkeypatch,
                                                                 capsys):
    slower = {1.0: [100.0, 101.0, 99.0, 100.5, 99.5], 0.7: [80.0, 81.0, 79.0, 80.5, 79.5],
              0.4: [300.0, 301.0, 299.0, 300.5, 299.5]}
    _canned(monkeypatch, slower)
    assert _detect(tiny_model_dir, tmp_path / "me.toml", "--measure-time", "0", "--rounds", "5") == 2
    err = capsys.readouterr().err
    assert ("profile detect: figures no cost model can be fitted to: onnx:fp32 decode at width 0.7 is "
            "slower than at width 1.0 beyond the interval: their ratio is 0.800 [0.798, 0.802] over 5 "
            "rounds" in err)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_too_few_rounds_to_decide_are_not_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The same narrower-slower figures over 3 rounds (a 75% interval): not enough to refuse."""
    _canned(monkeypatch, {1.0: [100.0, 101.0, 99.0], 0.7: [80.0, 81.0, 79.0], 0.4: [300.0, 301.0, 299.0]})
    assert _detect(tiny_model_dir, tmp_path / "me.toml", "--measure-time", "0") == 0


def test_overlapping_figures_are_not_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """0.7 measured slower than 1.0 in one round, faster in others: noise, not a refusal."""
    _canned(monkeypatch, {1.0: [100.0, 90.0, 110.0], 0.7: [95.0, 120.0, 125.0], 0.4: [300.0, 290.0, 310.0]})
    assert _detect(tiny_model_dir, tmp_path / "me.toml", "--measure-time", "0") == 0


def test_a_busy_machine_is_a_warning(tiny_model_dir, tmp_path, monkeypatch, capsys):
    busy = {"before": ["the hypervisor took 9% of the CPU time before measuring (steal, over 5%): other "
                       "virtual machines share these CPUs, and the intervals are wider for it"],
            "while": ["other processes took 60% of the CPU time while measuring"]}
    _canned(monkeypatch, {w: [v] * 3 for w, v in ((1.0, 100.0), (0.7, 130.0), (0.4, 200.0))}, busy)
    out = tmp_path / "me.toml"
    assert _detect(tiny_model_dir, out, "--measure-time", "0") == 0
    err = capsys.readouterr().err
    assert "warning: the hypervisor took 9%" in err and "warning: other processes took 60%" in err
    text = out.read_text()
    assert "# WARNING: the hypervisor took 9% of the CPU time before measuring" in text
    assert "# WARNING: other processes took 60% of the CPU time while measuring" in text
    load_profile(str(out))


def test_the_fit_weighs_each_figure_by_its_interval():
    """Three points on y = 5 + 2x, the last one off by +3: with equal weights it pulls the line;
    measured with an interval 100x wider than the others (a weight 1e-4 as large), it barely
    moves it."""
    points = [(1.0, 7.0), (2.0, 9.0), (3.0, 14.0)]
    a, b = _line(points)
    assert (a, b) == (pytest.approx(3.0), pytest.approx(2.5 + 1.0))
    a, b = _line(points, [1.0, 1.0, 1e-4])
    assert (a, b) == (pytest.approx(5.0, abs=0.01), pytest.approx(2.0, abs=0.01))
