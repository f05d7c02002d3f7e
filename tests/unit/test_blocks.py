"""Whole blocks as a structure (blocks.py): the choice, the plan, the checkpoint and both exports;
and the published-style coarse baselines (baselines.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from baselines import adaptive_dims, flap_adaptive_prune, flap_prune, llm_pruner_prune, uniform_dims

from mosaic_export.core.texts import corpus
from mosaic_export.method.blocks import choose_blocks
from mosaic_export.method.calibration import LayerStream, sample_windows, tokenize
from mosaic_export.method.plan import Plan, PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.method.pod import measure
from mosaic_export.method.prune.apply import apply_plan
from mosaic_export.model.arch import LayerDims
from mosaic_export.model.checkpoint import load_resized, save_checkpoint
from mosaic_export.model.load import decoder_counts, load_model
from mosaic_export.model.resize import resize_layer
from mosaic_export.targets.gguf.runner import _llama
from mosaic_export.targets.gguf.writer import export as gguf_export
from mosaic_export.targets.gguf.writer import gguf_arch
from mosaic_export.targets.onnx.runner import OnnxDecoder
from mosaic_export.targets.onnx.writer import export as onnx_export

IDS = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))


def blocks_model(tiny_model_dir):
    """The tiny model with layer 1 removed whole and layer 2's attention removed."""
    loaded = load_model(str(tiny_model_dir))
    layers, n_ff = loaded.spec.layer_list(loaded.model), loaded.shape.n_ff
    resize_layer(layers[1], loaded.spec, loaded.shape.head_dim, [], [], [])
    resize_layer(layers[2], loaded.spec, loaded.shape.head_dim, [], [], list(range(n_ff)))
    return loaded


def _logits(loaded, ids=IDS):
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits.numpy()


def test_choose_blocks_takes_the_cheapest_per_parameter_and_keeps_the_ends(tiny_model_dir):
    shape = load_model(str(tiny_model_dir)).shape
    dense = shape.dense_dims
    scores = [{"attention": 0.0, "mlp": 0.0, "layer": 0.0},  # layer 0: free, but never taken
              {"attention": 0.01, "mlp": 0.5, "layer": 0.6},
              {"attention": 0.2, "mlp": 0.3, "layer": 0.4}]
    attention = shape.layer_params(dense) - shape.layer_params(LayerDims(0, 0, dense.n_ff))
    assert choose_blocks(shape, scores, attention) == [dense, LayerDims(0, 0, dense.n_ff), dense]
    assert choose_blocks(shape, scores, attention - 1) == [dense] * 3  # nothing fits
    whole = shape.layer_params(dense)
    dims = choose_blocks(shape, scores, 2 * attention + whole)
    # layer 2 is cheaper whole, but the last layer keeps its MLP: its attention, then layer 1 whole
    assert dims == [dense, LayerDims(0, 0, 0), LayerDims(0, 0, dense.n_ff)]
    assert shape.layer_params(LayerDims(0, 0, 0)) == 0


def test_blocks_plan_prunes_to_its_counts_and_reloads(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    ids = sample_windows(tokenize(loaded.tokenizer, corpus("builtin")), 2, 32, 0, "builtin")
    measured = measure(LayerStream(loaded.model, loaded.spec, ids), loaded.spec, loaded.shape, 5.0)
    assert all(set(m.block_scores) == {"attention", "mlp", "layer"} for m in measured)
    plan = make_plan(loaded.shape, loaded.source, measured,
                     PruneSettings(sparsity=0.3, structured_fraction=1.0, structure="blocks"))
    assert plan.layers[0].dims == loaded.shape.dense_dims
    assert any(lp.dims.n_head == 0 for lp in plan.layers)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").to_json() == plan.to_json()
    apply_plan(LayerStream(loaded.model, loaded.spec, ids), loaded.spec, plan)
    counts = decoder_counts(loaded)
    p = plan.params()
    assert counts["decoder"] == p["decoder_resized"]
    assert 1 - p["decoder_nonzero"] / p["decoder_dense"] == pytest.approx(0.3, abs=0.01)
    save_checkpoint(loaded, tmp_path / "ck")
    again = load_resized(tmp_path / "ck")
    assert again.layer_dims == loaded.layer_dims
    assert np.abs(_logits(again) - _logits(loaded)).max() < 1e-5


def test_blocks_export_to_gguf_and_match(tiny_model_dir, tmp_path):
    loaded = blocks_model(tiny_model_dir)
    path = tmp_path / "m.gguf"
    gguf_export(loaded, path, "F32")
    assert gguf_arch(loaded) == "deci"
    llm = _llama(path, IDS.shape[1], threads=1, logits_all=True)
    llm.eval([int(t) for t in IDS[0]])
    got = np.asarray(llm.scores[: IDS.shape[1]])
    ref = _logits(loaded)[0]
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_blocks_export_to_onnx_and_match_with_the_cache(tiny_model_dir, tmp_path):
    loaded = blocks_model(tiny_model_dir)
    folder = onnx_export(loaded, tmp_path / "m", "fp32").parent
    decoder = OnnxDecoder(folder, threads=1)
    logits, present = decoder.forward(IDS.numpy(), decoder.empty_past())
    assert np.abs(logits - _logits(loaded)).max() < 1e-4
    assert len(present) == 2  # only layer 0 keeps a KV cache
    names = {i.name for i in decoder.session.get_inputs()}
    assert "past_key_values.0.key" in names and not any(n.startswith("past_key_values.1") for n in names)
    _, past = decoder.forward(IDS[:, :-1].numpy(), decoder.empty_past())
    step, _ = decoder.forward(IDS[:, -1:].numpy(), past)
    assert np.abs(step[0, -1] - logits[0, -1]).max() < 1e-4
    config = json.loads((folder / "model_config.json").read_text())
    assert [layer["n_kv"] for layer in config["layers"]] == [loaded.shape.n_kv, 0, 0]
    assert not (folder / "genai_config.json").exists()  # GenAI sizes one cache for every layer


def test_uniform_dims_land_on_the_target(tiny_model_dir):
    shape = load_model(str(tiny_model_dir)).shape
    dims = uniform_dims(shape, 0.3, [1, 2])
    assert dims[0] == shape.dense_dims and dims[1] == dims[2]
    removed = 1 - sum(shape.layer_params(d) for d in dims) / (3 * shape.layer_params(shape.dense_dims))
    assert removed == pytest.approx(0.3, abs=0.02)


def test_adaptive_dims_rank_the_whole_model(tiny_model_dir):
    """FLAP's adaptive structure: the layer whose heads and channels score lowest loses the most,
    and the total lands on the target."""
    shape = load_model(str(tiny_model_dir)).shape
    gen = torch.Generator().manual_seed(0)
    heads = torch.randn(shape.n_layers, shape.n_head, generator=gen, dtype=torch.float64)
    channels = torch.randn(shape.n_layers, shape.n_ff, generator=gen, dtype=torch.float64)
    heads[1] -= 3
    channels[1] -= 3
    dims = adaptive_dims(shape, heads, channels, 0.3)
    params = [shape.layer_params(d) for d in dims]
    assert params[1] < min(params[0], params[2])
    assert all(d.n_head >= 1 and d.n_ff >= 1 for d in dims)
    removed = 1 - sum(params) / (shape.n_layers * shape.layer_params(shape.dense_dims))
    assert removed == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("prune", [flap_prune, flap_adaptive_prune, llm_pruner_prune])
def test_baselines_remove_the_target_and_run(tiny_model_dir, prune):
    loaded = load_model(str(tiny_model_dir))
    ids = sample_windows(tokenize(loaded.tokenizer, corpus("builtin")), 2, 32, 0, "builtin")
    dense = decoder_counts(loaded)["decoder"]
    prune(loaded.model, loaded.spec, loaded.shape, ids, 0.3)
    assert 1 - decoder_counts(loaded)["decoder"] / dense == pytest.approx(0.3, abs=0.03)
    assert np.isfinite(_logits(loaded)).all()


def test_flap_bias_compensation_keeps_the_mean_output(tiny_model_dir):
    """The removed heads' mean contribution comes back as o's bias: on the calibration tokens the
    mean attention output of layer 0 (whose kept heads see the same embeddings) is unchanged."""
    loaded = load_model(str(tiny_model_dir))
    ids = sample_windows(tokenize(loaded.tokenizer, corpus("builtin")), 2, 32, 0, "builtin")
    o_proj = loaded.spec.projection(loaded.spec.layer_list(loaded.model)[0], "o")
    outputs = []
    hook = o_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out.flatten(0, 1)))
    with torch.no_grad():
        loaded.model(input_ids=ids)
    before = torch.cat(outputs).double().mean(0)
    flap_prune(loaded.model, loaded.spec, loaded.shape, ids, 0.3)
    o_proj = loaded.spec.projection(loaded.spec.layer_list(loaded.model)[0], "o")
    outputs.clear()
    hook.remove()
    hook = o_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out.flatten(0, 1)))
    with torch.no_grad():
        loaded.model(input_ids=ids)
    hook.remove()
    after = torch.cat(outputs).double().mean(0)
    assert o_proj.bias is not None
    assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max()) + 1e-6)


@pytest.mark.parametrize("target", ["gguf", "onnx"])
def test_blocks_run_end_to_end(tiny_model_dir, tmp_path, target, monkeypatch, capsys):
    """The main command with --structure blocks: the plan removes blocks, the exported file
    passes the target's parity checks, and (ONNX) the app README's onnxruntime snippet runs."""
    import re

    from mosaic_export.cli import main

    out = tmp_path / target
    assert main(["--model", str(tiny_model_dir), "--sparsity", "0.3", "--structured-fraction", "1",
                 "--structure", "blocks", "--calib-samples", "4", "--calib-seq-len", "64",
                 "--eval-windows", "0", "--target", target, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [d["n_head"] == 0 for d in report["layers"]] == [False, True, True]
    assert report[target]["parity"]
    if target == "onnx":
        assert not report["onnx"]["genai"]
        readme = (out / "README.md").read_text()
        code = re.search(r"```python\n(import json\n.*?)```", readme, re.S).group(1)
        monkeypatch.chdir(out)
        exec(compile(code, "README.md", "exec"), {})
        assert capsys.readouterr().out
