"""The sweep's folder: an interrupted sweep resumes from the runs that finished; fronts and
tables never mix machines without a label."""

from __future__ import annotations

import csv
import json

import pytest

from mosaic_export.cli import main
from mosaic_export.run import sweep as sweep_module
from tests.unit.test_budgets import FAST, PROFILE


@pytest.fixture(scope="module")
def args(tiny_model_dir, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "tiny.toml"
    profile.write_text(PROFILE)
    return ["sweep", "--model", str(tiny_model_dir), "--profile", str(profile), *FAST,
            "--targets", "0", "0.3"]


def test_an_interrupted_sweep_resumes_from_the_finished_runs(args, tmp_path, monkeypatch, capsys):
    out, calls = tmp_path / "sweep", []
    real = sweep_module.run

    def interrupted(config, log=print, shared=None):
        calls.append(config.out.name)
        if config.out.name == "r0.30" and calls.count("r0.30") == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        return real(config, log=log, shared=shared)

    monkeypatch.setattr(sweep_module, "run", interrupted)
    assert main([*args, "--out", str(out)]) == 130
    assert "the sweep stopped with 1 of 2 runs finished" in capsys.readouterr().err
    work = tmp_path / ".sweep.sweep"
    assert not out.exists() and (work / "r0.00" / "report.json").is_file()
    assert not (work / "r0.30").exists()
    assert main([*args, "--out", str(out)]) == 0
    assert "resuming the sweep" in capsys.readouterr().out
    assert calls == ["r0.00", "r0.30", "r0.30"]  # the finished run was not made again
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["target"] for r in rows] == ["0.0", "0.3"] and not work.exists()
    record = json.loads((out / "sweep.json").read_text())
    assert set(record["runs"]) == {"r0.00", "r0.30"}


def test_an_interrupted_sweep_with_other_settings_is_kept_unless_forced(args, tmp_path, capsys):
    out = tmp_path / "sweep"
    work = tmp_path / ".sweep.sweep"
    (work / "r0.00").mkdir(parents=True)
    (work / "sweep.json").write_text(json.dumps({"settings": {"other": 1}, "runs": {"r0.00": {}}}))
    assert main([*args, "--targets", "0", "--out", str(out)]) == 2
    assert "holds an interrupted sweep with other settings" in capsys.readouterr().err
    assert (work / "r0.00").is_dir() and not out.exists()
    assert main([*args, "--targets", "0", "--out", str(out), "--force"]) == 0
    assert "an interrupted sweep with other settings" in capsys.readouterr().out
    assert [r["target"] for r in csv.DictReader(open(out / "sweep.csv"))] == ["0.0"]


def test_a_sweep_that_fails_before_any_run_leaves_nothing(args, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main([*args, "--calib-text", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "text file not found" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--ray-cpus", "2"], "--ray-cpus is for work on a Ray cluster"),
    (["--retries", "1"], "--retries is for work on a Ray cluster"),
    (["--ray", "auto", "--retries", "-1"], "--retries must be >= 0"),
    (["--ray", "auto", "--ray-cpus", "0"], "--ray-cpus must be a positive integer"),
])
def test_bad_cluster_options_fail_at_the_door(args, tmp_path, capsys, extra, message):
    assert main([*args, *extra, "--out", str(tmp_path / "sweep")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_runs_from_several_machines_get_fronts_of_their_own(tmp_path):
    row = dict(type="Q8_0", target=0.0, removed=0.0, perplexity=10.0, memory_bytes=100 * 2**20,
               decode_tokens_per_s=50.0, prefill_tokens_per_s=500.0, file_bytes=2**20,
               predicted_memory_bytes=None, predicted_decode_tokens_per_s=None, attempts=1)
    rows = [dict(row, machine="fast"), dict(row, target=0.3, removed=0.3, perplexity=12.0,
                                            decode_tokens_per_s=40.0, machine="slow"),
            dict(row, target=0.3, removed=0.3, perplexity=12.0, decode_tokens_per_s=60.0,
                 machine="fast", attempts=2)]
    sweep_module._write(tmp_path, rows, "gguf")
    report = (tmp_path / "report.md").read_text()
    assert "fronts are per machine" in report and "| machine |" in report
    # The slow machine's only run is on its own speed front although the fast one beats it.
    table = [line for line in report.splitlines() if line.startswith("| Q8_0")]
    assert table[1].endswith("| yes | yes | slow |")
    assert "Q8_0 30% (2 attempts)" in report and (tmp_path / "pareto.png").is_file()


def test_a_sweep_run_is_the_main_command_at_its_target(args, tmp_path):
    """The shared dense pass changes nothing: a sweep's run has the plan and the files of the main
    command at the same removal."""
    from tests.integration.test_ray_sweep import _artifacts

    assert main([*args, "--targets", "0.3", "--out", str(tmp_path / "sweep")]) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    assert main([*args[1:-3], "--sparsity", "0.3", "--structured-fraction", "1",
                 "--out", str(alone / "r0.30")]) == 0
    assert _artifacts(tmp_path / "sweep") == _artifacts(alone) != {}
