"""The whole pipeline through the CLI on a tiny random Llama with a real tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mosaic_export.cli import main
from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.plan import Plan
from mosaic_export.model.load import load_model

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "3",
        "--eval-seq-len", "64", "--align", "1", "--target", "none"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def composite(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "composite"
    code = run_cli("--model", tiny_model_dir, "--sparsity", "0.4", "--structured-fraction", "0.5",
                   *FAST, "--out", out)
    assert code == 0
    return out


def test_outputs_and_counts(composite):
    names = sorted(p.name for p in composite.iterdir())
    assert names == ["README.md", "manifest.json", "model", "plan.json", "pod.png", "report.json",
                     "report.md", "run.toml"]
    report = json.loads((composite / "report.json").read_text())
    plan = Plan.load(composite / "plan.json")
    params = plan.params()
    assert report["params"]["pruned"]["decoder"] == params["decoder_resized"]
    assert report["params"]["pruned"]["decoder"] < report["params"]["dense"]["decoder"]
    removed = 1 - report["params"]["pruned"]["decoder_nonzero"] / report["params"]["dense"]["decoder"]
    assert removed == pytest.approx(0.4, abs=0.01)
    structured = 1 - params["decoder_resized"] / params["decoder_dense"]
    assert structured == pytest.approx(0.2, abs=0.04)  # tiny model: coarse heads
    assert report["reload"]["max_abs_logit_diff"] < 1e-4
    pruned = report["perplexity"]["pruned"]  # 3 windows of 64 tokens, 63 predicted in each
    assert pruned["n_predicted"] == 3 * 63 and pruned["perplexity"] == pytest.approx(math.exp(pruned["nll"]))


def test_reload_has_plan_shapes_and_reported_perplexity(composite):
    loaded = load_model(str(composite / "model"))
    plan = Plan.load(composite / "plan.json")
    assert loaded.layer_dims == [lp.dims for lp in plan.layers]
    for layer, lp in zip(loaded.spec.layer_list(loaded.model), plan.layers, strict=True):
        assert loaded.spec.projection(layer, "q").weight.shape[0] == lp.dims.n_head * 16
        assert loaded.spec.projection(layer, "down").weight.shape[1] == lp.dims.n_ff
    assert sum(p.numel() for p in loaded.spec.layer_list(loaded.model).parameters()) == \
        plan.params()["decoder_resized"]
    # Independent perplexity of the reloaded model on the same windows as the report.
    report = json.loads((composite / "report.json").read_text())
    ids = windows(tokenize(loaded.tokenizer, corpus("builtin-heldout")), 64, 3, "heldout")
    again = perplexity(loaded.model, ids, "heldout")
    assert again.perplexity == pytest.approx(report["perplexity"]["pruned"]["perplexity"], rel=1e-5)


def test_plan_reapplied_reproduces_weights(composite, tiny_model_dir, tmp_path):
    out = tmp_path / "again"
    assert run_cli("--model", tiny_model_dir, "--plan", composite / "plan.json", *FAST,
                   "--out", out) == 0
    shards = sorted(p.name for p in (composite / "model").glob("*.safetensors"))
    assert len(shards) == 4  # outside the layers, then one per layer
    assert shards == sorted(p.name for p in (out / "model").glob("*.safetensors"))
    for name in shards:
        assert (composite / "model" / name).read_bytes() == (out / "model" / name).read_bytes()
    assert (composite / "plan.json").read_text() == (out / "plan.json").read_text()


def test_same_seed_same_plan_other_seed_other_plan(tiny_model_dir, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_cli("plan", "--model", tiny_model_dir, "--sparsity", "0.5",
                       "--structured-fraction", "0.5", "--calib-samples", "4",
                       "--calib-seq-len", "64", "--align", "1", "--seed", seed,
                       "--write-plan", tmp_path / f"{name}.json") == 0
    a, b, c = ((tmp_path / f"{n}.json").read_text() for n in "abc")
    assert a == b and a != c


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["uniform", "layer", "projection"])
def test_unstructured_methods(tiny_model_dir, tmp_path, method, allocation):
    out = tmp_path / "o"
    assert run_cli("--model", tiny_model_dir, "--sparsity", "0.5", "--method", method,
                   "--allocation", allocation, *FAST, "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    p = report["params"]
    assert p["pruned"]["decoder"] == p["dense"]["decoder"]  # nothing removed physically
    assert 1 - p["pruned"]["decoder_nonzero"] / p["dense"]["decoder"] == pytest.approx(0.5, abs=0.01)


def test_magnitude_scores_choose_by_weights_alone(tiny_model_dir, tmp_path):
    """The coarse baseline: same plan shape whatever the calibration, channels ranked by weights."""
    from mosaic_export.method.prune.structured import choose_channels, magnitude_channel_scores
    from mosaic_export.model.arch import arch_for

    plans = []
    for seed in (0, 1):
        f = tmp_path / f"plan{seed}.json"
        assert run_cli("plan", "--model", tiny_model_dir, "--sparsity", "0.3", "--structured-fraction",
                       "1", "--allocation", "uniform", "--structured-scores", "magnitude",
                       "--no-compensate", "--calib-samples", "2", "--calib-seq-len", "32",
                       "--seed", seed, "--align", "1", "--write-plan", f) == 0
        plans.append(Plan.load(f))
    assert [lp.channels for lp in plans[0].layers] == [lp.channels for lp in plans[1].layers]
    assert plans[0].settings.structured_scores == "magnitude" and not plans[0].settings.compensate
    loaded, spec = load_model(tiny_model_dir), arch_for("llama")
    for layer, lp in zip(spec.layer_list(loaded.model), plans[0].layers, strict=True):
        w = {p: spec.projection(layer, p).weight for p in ("gate", "up", "down")}
        expected = choose_channels(magnitude_channel_scores(w["gate"], w["up"], w["down"]), len(lp.channels))
        assert lp.channels == expected


def test_top1_accuracy_matches_direct_count(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    ids = windows(tokenize(loaded.tokenizer, corpus("builtin-heldout")), 64, 3, "heldout")
    result = perplexity(loaded.model, ids, "heldout", logits_chunk=16)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[:, :-1]
    direct = (logits.argmax(-1) == ids[:, 1:]).float().mean().item()
    assert result.top1 == pytest.approx(direct, abs=1e-9)
    assert 0 < result.top1 < 1


def test_alignment_rounds_channels(tiny_model_dir, tmp_path):
    f = tmp_path / "plan.json"
    assert run_cli("plan", "--model", tiny_model_dir, "--sparsity", "0.3",
                   "--structured-fraction", "1", "--calib-samples", "2", "--calib-seq-len", "32",
                   "--align", "32", "--write-plan", f) == 0
    plan = Plan.load(f)
    assert all(lp.dims.n_ff % 32 == 0 for lp in plan.layers)
    assert any(lp.dims.n_ff < 96 for lp in plan.layers)


# --- bad input: one clear message, exit code 2, no output folder ----------------------------


def _bad(tmp_path, capsys, *args, match: str):
    out = tmp_path / "out"
    code = run_cli("--sparsity", "0.3", *args, *FAST, "--out", out)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_missing_model(tmp_path, capsys):
    _bad(tmp_path, capsys, "--model", tmp_path / "nope", match="model not found")


def test_folder_without_weights(tmp_path, capsys, tiny_model_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    _bad(tmp_path, capsys, "--model", folder, match="no weights")


def test_unsupported_architecture(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _bad(tmp_path, capsys, "--model", folder,
         match="architecture 'gpt2' is not supported; supported: gemma3_text, llama, mistral, "
               "phi3, qwen2, qwen3")


def test_profile_typo(tmp_path, capsys, tiny_model_dir):
    _bad(tmp_path, capsys, "--model", tiny_model_dir, "--profile", "jetson-orn",
         match="unknown profile 'jetson-orn'")


@pytest.mark.parametrize("value", ["0.97", "-0.1"])
def test_sparsity_out_of_range(tmp_path, capsys, tiny_model_dir, value):
    _bad(tmp_path, capsys, "--model", tiny_model_dir, "--sparsity", value,
         match="sparsity must be in [0, 0.95]")


def test_short_calibration_text(tmp_path, capsys, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _bad(tmp_path, capsys, "--model", tiny_model_dir, "--calib-text", short,
         match="fewer than one sample")


def test_output_exists(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "out").mkdir()
    code = run_cli("--model", tiny_model_dir, "--sparsity", "0.3", *FAST, "--out", tmp_path / "out")
    assert code == 2 and "exists; pass --force" in capsys.readouterr().err


def test_full_disk_leaves_nothing(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from mosaic_export.run import pipeline

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.Plan, "save", no_space)
    _bad(tmp_path, capsys, "--model", tiny_model_dir, match="No space left on device")


def test_stats_use_pruned_inputs(tiny_model_dir):
    """Layer i's statistics in pass 2 come from the already-pruned layers before it."""
    from mosaic_export.method.calibration import LayerStream

    loaded = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    stream = LayerStream(loaded.model, loaded.spec, ids, batch_size=1)
    layers = loaded.spec.layer_list(loaded.model)
    dense = LayerStream(loaded.model, loaded.spec, ids, batch_size=1)
    dense.advance(layers[0])
    dense_next = torch.cat(dense.hidden)
    with torch.no_grad():
        loaded.spec.projection(layers[0], "down").weight.mul_(0.5)
    stream.advance(layers[0])
    assert not torch.allclose(torch.cat(stream.hidden), dense_next)
    # And the captured inputs equal the embeddings.
    emb = loaded.model.get_input_embeddings()(ids)
    assert torch.equal(torch.cat(LayerStream(loaded.model, loaded.spec, ids, 1).hidden), emb)
