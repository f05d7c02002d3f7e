"""The main command with budgets on the tiny model: search, report, and every bad budget."""

from __future__ import annotations

import json

import pytest

from mosaic_export.cli import main
from mosaic_export.decide.costmodel import Calibration, Format, Pricing
from mosaic_export.method.plan import Plan
from mosaic_export.model.load import load_model
from tests.conftest import PROFILE  # noqa: F401  (imported from here by other tests)

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2", "--eval-seq-len", "64",
        "--dtype", "fp32"]  # the type fixed: the search varies structure only (joint: test_joint.py)


def _dense_cost(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    calib = Calibration(0.0, 1e9, 0.0, 1e10, 0.0, 1.0, "measured")
    pricing = Pricing(loaded.shape, Format("onnx", "fp32"), calib, 64)
    return pricing.cost([loaded.shape.dense_dims] * loaded.shape.n_layers)


def test_search_prunes_to_the_budget(tiny_model_dir, profile, tmp_path, capsys):
    dense = _dense_cost(tiny_model_dir)
    budget = int(dense.memory_bytes * 0.9)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST,
                 "--max-memory", f"{budget}B", "--margin", "0", "--check-neighbour",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the least that meets every budget" in printed and "peak memory <=" in printed
    report = json.loads((out / "report.json").read_text())
    cost, found = report["cost"], report["cost"]["search"]
    assert "joint" not in report and cost["format"] == "onnx:fp32"  # --dtype fixes the type
    assert cost["basis"] == "measured" and not cost["profile_local"]
    assert 0 < found["chosen"]["removed"] and cost["predicted"]["memory_bytes"] <= budget
    assert found["neighbour"]["removal_target"] == pytest.approx(
        max(0.0, found["chosen"]["removal_target"] - 0.05))
    assert not all(b["met"] for b in found["neighbour"]["budgets"])
    measured = cost["neighbour_measured"]  # that plan built and run, as --check-neighbour asks
    assert measured["removed"] == pytest.approx(found["neighbour"]["removed"])
    assert measured["memory_bytes"] > 0 and "with 5% less pruning" in printed
    plan = Plan.load(out / "plan.json")
    assert plan.params()["decoder_resized"] < plan.params()["decoder_dense"]
    # no unstructured part but the rounding of whole channels (under 0.1% of a projection)
    assert all(r < 1e-3 for lp in plan.layers for r in lp.ratios.values())
    assert cost["measured"]["memory_bytes"] > 0 and cost["measured"]["context"] >= 64
    for name in ("report.md", "cost.png", "pod.png", "onnx-fp32"):
        assert (out / name).exists(), name


def test_dense_model_that_fits_is_not_pruned(tiny_model_dir, profile, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST,
                 "--max-memory", "1GiB", "--min-tokens-per-s", "1", "--out", str(out)]) == 0
    assert "the dense model already meets every budget" in capsys.readouterr().out
    plan = Plan.load(out / "plan.json")
    assert plan.params()["decoder_resized"] == plan.params()["decoder_dense"]


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "10B"], "no plan meets the budgets (with a 2% margin for the cost model's error): "
                              "peak memory budget <= 10 B cannot be met: the closest is"),
    (["--max-memory", "80"], "expected a size with a unit"),
    (["--max-memory", "80 parsecs"], "expected a size as a number and one of the units"),
    (["--min-tokens-per-s", "-5"], "--min-tokens-per-s: expected a positive value"),
    (["--max-memory", "20GiB"], "contradictory budgets: max memory 20.0 GiB exceeds the device"),
    (["--context", "100000"], "context of 100000 tokens is longer than the model's"),
    (["--target", "none"], "--target none writes no runtime file"),
    (["--profile", "no-such-device"], "unknown profile 'no-such-device'"),
])
def test_bad_budgets_fail_at_the_door(tiny_model_dir, profile, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--out", str(out), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))


def test_search_with_the_error_allocation_meets_the_budget(tiny_model_dir, profile, tmp_path):
    """The data-driven allocation under the search: the search picks the removal that meets the
    memory budget by the cost model, the knapsack spreads it by the measured errors."""
    budget = int(_dense_cost(tiny_model_dir).memory_bytes * 0.9)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--allocation", "error",
                 "--max-memory", f"{budget}B", "--margin", "0", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    found = report["cost"]["search"]["chosen"]
    assert 0 < found["removed"] and report["cost"]["predicted"]["memory_bytes"] <= budget
    plan = Plan.load(out / "plan.json")
    assert plan.settings.allocation == "error" and plan.settings.structured_fraction == 1.0


def test_explicit_sparsity_reports_budgets_without_search(tiny_model_dir, profile, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--sparsity", "0.3",
                 "--structured-fraction", "1", "--max-memory", "10B", "--out", str(out)]) == 0
    cost = json.loads((out / "report.json").read_text())["cost"]
    assert cost["search"] is None
    assert [b["name"] for b in cost["predicted_budgets"]] == ["max_memory"]
    assert not cost["predicted_budgets"][0]["met"]


def test_plan_dry_run_searches_and_writes_nothing(tiny_model_dir, profile, tmp_path, capsys):
    budget = int(_dense_cost(tiny_model_dir).memory_bytes * 0.9)
    assert main(["plan", "--model", str(tiny_model_dir), "--profile", str(profile), "--calib-samples",
                 "4", "--calib-seq-len", "64", "--max-memory", f"{budget}B"]) == 0
    out = capsys.readouterr().out
    assert "the least that meets every budget" in out and "decoder parameters: dense" in out
    assert not list(tmp_path.iterdir())


def test_sweep_writes_runs_csv_and_pareto_front(tiny_model_dir, profile, tmp_path):
    import csv

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_model_dir), "--profile", str(profile), *FAST,
                 "--targets", "0", "0.3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [float(r["target"]) for r in rows] == [0.0, 0.3]
    assert float(rows[1]["removed"]) > 0.2 and float(rows[1]["memory_bytes"]) > 0
    for name in ("r0.00", "r0.30", "pareto.png", "report.md"):
        assert (out / name).exists(), name


def test_pareto_front():
    from mosaic_export.run.sweep import pareto

    # (memory, perplexity): the third is worse on both than the second
    assert pareto([(100, 10.0), (80, 12.0), (90, 13.0), (60, 20.0)], larger_is_better=False) == [0, 1, 3]
    # (tokens/s, perplexity): higher speed is better
    assert pareto([(10, 10.0), (20, 12.0), (15, 13.0)], larger_is_better=True) == [0, 1]


@pytest.fixture(scope="module")
def built(tiny_model_dir, profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--sparsity", "0.3",
                 "--structured-fraction", "1", "--out", str(out)]) == 0
    return out


def test_manifest_lists_every_file_and_verify_passes(built, capsys):
    from mosaic_export.bundle.deploy import sha256

    manifest = json.loads((built / "manifest.json").read_text())
    files = {p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert "README.md" in files and "onnx-fp32/model.onnx.data" in files
    assert all(sha256(built / n) == e["sha256"] for n, e in manifest["files"].items())
    assert manifest["format"] == {"target": "onnx", "dtype": "fp32", "opset": 17,
                                  "model_path": "onnx-fp32/model.onnx", "genai": True}
    assert len(manifest["layers"]) == 3 and manifest["versions"]["onnxruntime"]
    assert manifest["cost"]["predicted"]["memory_bytes"] > 0 and len(manifest["parity"]["ids"]) == 64
    assert main(["verify", str(built)]) == 0
    assert "OK" in capsys.readouterr().out


def test_same_inputs_same_files(built, tiny_model_dir, profile, tmp_path):
    out = tmp_path / "again"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--sparsity", "0.3",
                 "--structured-fraction", "1", "--out", str(out)]) == 0
    first, second = (json.loads((o / "manifest.json").read_text())["files"] for o in (built, out))
    # Every file is byte-identical but those holding measured figures (timings, speed, memory) and
    # run.toml, which names its own OUT.
    measured = {"report.json", "report.md", "README.md", "cost.png", "run.toml"}
    assert set(first) == set(second)
    assert {k: v for k, v in first.items() if k not in measured} == \
        {k: v for k, v in second.items() if k not in measured}


def test_verify_finds_a_changed_byte_and_a_stray_file(built, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    data = out / "onnx-fp32" / "model.onnx.data"
    original = data.read_bytes()
    data.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    assert main(["verify", str(out)]) == 2
    assert "onnx-fp32/model.onnx.data has changed" in capsys.readouterr().err
    data.write_bytes(original)
    (out / "notes.txt").write_text("x")
    assert main(["verify", str(out)]) == 2
    assert "notes.txt is not in the manifest" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == 2


def test_run_generates_deterministically(built, capsys):
    args = ["run", str(built), "--prompt", "def f(x):", "--max-tokens", "8", "--no-chat"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_profile_detect_writes_a_calibrated_local_profile(tiny_model_dir, tmp_path, capsys):
    from mosaic_export.decide.profile import load_profile

    out = tmp_path / "me.toml"
    # --force: the tiny model's widths cost about the same, so on a shared machine its figures may
    # fail the trust checks (tests/unit/test_detect_trust.py covers those); this tests the writing
    # two rounds, no more (the rounds themselves: tests/unit/test_measure.py)
    assert main(["profile", "detect", "--model", str(tiny_model_dir), "--target", "onnx",
                 "--context", "64", "--rounds", "2", "--measure-time", "0", "--out", str(out),
                 "--force"]) == 0
    p = load_profile(str(out))
    calib = p.calibration_for(Format("onnx", "fp32"))
    assert p.local and p.runtime.target == "onnx" and p.budgets.context == 64
    assert calib.basis == "measured" and calib.bandwidth > 0 and calib.memory_per_weight_byte > 0
    assert p.device.memory_bandwidth > 0 and p.device.compute_flops > 0
    assert "width 0.4" in capsys.readouterr().out
    assert main(["profile", "detect", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["me.toml"]  # no temporary file left
