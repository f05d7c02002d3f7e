"""OUT/run.toml: every run writes the configuration it ran, and `--config` runs it again to the same
plan and the same bytes (the main command and the sweep)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from mosaic_export.cli import main
from mosaic_export.measure.rounds import Policy
from mosaic_export.method.plan import CalibrationSettings, PruneSettings
from mosaic_export.method.recover import RecoverSettings
from mosaic_export.run import replay
from mosaic_export.run.config import RunConfig
from tests.unit.test_budgets import FAST, PROFILE

VARYING = {"report.json", "report.md", "README.md", "manifest.json", "cost.png", "run.toml", "sweep.csv",
           "sweep.json", "pareto.png"}


def _bytes(out: Path) -> dict[str, str]:
    """sha256 of every file but those that carry timings (the reports, the sweep table and what is
    made from them)
    and run.toml (it names its own OUT)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VARYING}


def test_a_configuration_reads_back_as_it_was_written(tmp_path):
    config = RunConfig(model="m", out=tmp_path / "o", eval_windows=None, types=("Q8_0", "Q4_0"),
                       recover=RecoverSettings(tokens=4096, text="builtin,self"), margin=0.05,
                       policy=Policy(precision=0.1, max_seconds=12.5), budgets={"max_memory": 2**30},
                       max_rss=3 * 2**30, stream=True)
    replay.write(tmp_path, config, {"targets": [0.0, 0.25]})
    again, extra = replay.load(tmp_path / replay.RUN_FILE)
    assert again == config and extra == {"targets": [0.0, 0.25]}
    assert replay.load(_written(tmp_path, RunConfig()))[0] == RunConfig()


def test_input_paths_are_written_absolute_so_the_file_runs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("me.toml").write_text(PROFILE)
    Path("calib.txt").write_text("text")
    settings = PruneSettings(calibration=CalibrationSettings("calib.txt"))
    config = RunConfig(profile="me.toml", settings=settings, recover=RecoverSettings(text="self,calib.txt"))
    again = replay.load(_written(tmp_path, config))[0]
    assert again.profile == str(tmp_path / "me.toml") and again.eval_text == config.eval_text  # a name
    assert again.settings.calibration.source == str(tmp_path / "calib.txt")
    assert again.recover.text == f"self,{tmp_path / 'calib.txt'}"


def _written(folder: Path, config: RunConfig) -> Path:
    replay.write(folder, config)
    return folder / replay.RUN_FILE


def test_a_bad_file_is_refused_with_one_line(tmp_path, capsys):
    bad = tmp_path / "run.toml"
    bad.write_text('format = "mosaic-export run"\nversion = 1\nunset = []\nsparsity = 0.3\n')
    assert main(["--config", str(bad)]) == 2
    assert "unknown keys sparsity" in capsys.readouterr().err
    bad.write_text("profile = 'x'\n")
    assert main(["--config", str(bad)]) == 2
    assert "not a mosaic-export run file of version 1" in capsys.readouterr().err
    good = _written(tmp_path, RunConfig(out=tmp_path / "o"))
    assert main(["--config", str(good), "--sparsity", "0.3"]) == 2
    assert "give only --out and --force beside it, not --sparsity" in capsys.readouterr().err
    assert main(["sweep", "--config", str(good)]) == 2
    assert "this is a main-command run's file" in capsys.readouterr().err


def test_config_replays_a_run_to_the_same_plan_and_bytes(tiny_model_dir, profile, tmp_path):
    first = tmp_path / "first"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), "--sparsity", "0.4",
                 "--structured-fraction", "0.5", "--method", "sparsegpt", *FAST, "--out", str(first)]) == 0
    config, extra = replay.load(first / "run.toml")
    assert extra is None and config.settings.method == "sparsegpt" and config.out == first
    again = tmp_path / "again"
    assert main(["--config", str(first / "run.toml"), "--out", str(again)]) == 0
    assert replay.load(again / "run.toml")[0] == replace(config, out=again)
    assert (again / "plan.json").read_bytes() == (first / "plan.json").read_bytes()
    assert _bytes(again) == _bytes(first) and any(k.endswith(".safetensors") for k in _bytes(first))


def test_config_replays_a_sweep(tiny_model_dir, profile, tmp_path):
    first = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_model_dir), "--profile", str(profile), *FAST,
                 "--targets", "0", "0.3", "--out", str(first)]) == 0
    assert replay.load(first / "run.toml")[1] == {"targets": [0.0, 0.3]}
    again = tmp_path / "again"
    assert main(["sweep", "--config", str(first / "run.toml"), "--out", str(again)]) == 0
    assert _bytes(again) == _bytes(first) and len([k for k in _bytes(first) if k.endswith("plan.json")]) == 2
