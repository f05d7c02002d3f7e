"""Bigger than memory (issue 15): the synthetic checkpoint tool and weights read one tensor at a
time (mosaic_export/weights.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaic_export.model.load import load_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
         "--vocab", "336", "--shard-size", "40KiB"]


def _make(out: Path, tokenizer: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--out", str(out),
                           "--tokenizer", str(tokenizer), *SMALL, *more],
                          capture_output=True, text=True, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_make_synthetic_writes_a_loadable_deterministic_checkpoint(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        done = _make(out, tiny_model_dir)
        assert done.returncode == 0, done.stderr
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 40 KiB
    assert _digest(a) == _digest(b) and len(_digest(a)) == len(set(index["weight_map"].values()))
    loaded = load_model(str(a))
    assert len(loaded.tokenizer) == 336  # the tiny tokenizer's 320, padded to --vocab
    assert (loaded.shape.n_layers, loaded.shape.hidden, loaded.shape.n_head, loaded.shape.n_kv,
            loaded.shape.n_ff, loaded.shape.vocab) == (2, 64, 4, 2, 96, 336)
    q = loaded.spec.projection(loaded.spec.layer_list(loaded.model)[0], "q").weight
    assert q.std().item() == pytest.approx(0.02, rel=0.1)  # bf16-rounded normal weights
    assert torch.equal(q, q.bfloat16().float())  # stored in bf16
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    other = _make(tmp_path / "c", tiny_model_dir, "--seed", "1")
    assert other.returncode == 0 and _digest(tmp_path / "c") != _digest(a)


def test_make_synthetic_refuses_bad_requests(tiny_model_dir, tmp_path):
    (tmp_path / "there").mkdir()
    done = _make(tmp_path / "there", tiny_model_dir)
    assert done.returncode == 2 and "exists" in done.stderr
    done = _make(tmp_path / "small", tiny_model_dir, "--vocab", "100")
    assert done.returncode == 2 and "320 tokens, more than --vocab 100" in done.stderr
    assert not any(p.name.startswith(".small") for p in tmp_path.iterdir())  # nothing half-written


def _run(model: Path, out: Path, *more: str) -> dict:
    from mosaic_export.cli import main

    assert main(["--model", str(model), "--sparsity", "0.3", "--structured-fraction", "1",
                 "--method", "sparsegpt", "--calib-samples", "4", "--calib-seq-len", "64",
                 "--eval-windows", "2", "--eval-seq-len", "64", "--out", str(out), *more]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("target", [["--target", "none"], ["--target", "none", "--calib-states", "bfloat16"],
                                    ["--target", "gguf", "--quant", "Q8_0"],
                                    ["--target", "onnx", "--dtype", "fp16"],
                                    ["--target", "onnx", "--dtype", "int4"]])
def test_streamed_run_writes_the_same_plan_and_bytes(tiny_model_dir, tmp_path, target, monkeypatch):
    """The main command with --stream: the same plan, checkpoint (and GGUF or ONNX) bytes, counts and
    perplexities as the run with the model in memory; nothing left beside the output. The tables
    are read, scored and written 50 rows at a time, as a large vocabulary's would be."""
    _check_same_outputs(tiny_model_dir, tmp_path, target, monkeypatch)


def test_streamed_run_with_an_untied_output_layer(tiny_model_dir, tmp_path, monkeypatch):
    """The same with an output layer of its own (as Llama-3.1-8B's): its table read, scored and
    written in chunks too (ONNX stores it transposed: each chunk a band of columns)."""
    model = tmp_path / "untied"
    done = _make(model, tiny_model_dir, "--no-tie")
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "runs"
    runs.mkdir()
    _check_same_outputs(model, runs, ["--target", "gguf", "--quant", "Q8_0"], monkeypatch, tied=False)
    onnx_runs = tmp_path / "onnx"
    onnx_runs.mkdir()
    _check_same_outputs(model, onnx_runs, ["--target", "onnx", "--dtype", "fp32"], monkeypatch, tied=False)
    int_runs = tmp_path / "int8"
    int_runs.mkdir()
    _check_same_outputs(model, int_runs, ["--target", "onnx", "--dtype", "int8"], monkeypatch, tied=False)


def _check_same_outputs(model: Path, tmp_path: Path, target: list[str], monkeypatch, tied: bool = True):
    from mosaic_export.model import weights

    monkeypatch.setattr(weights, "TABLE_CHUNK", 64 * 4 * 50)
    whole = _run(model, tmp_path / "whole", *target)
    streamed = _run(model, tmp_path / "streamed", *target, "--stream")
    files = sorted(str(p.relative_to(tmp_path / "whole")) for p in (tmp_path / "whole").rglob("*")
                   if p.suffix in (".json", ".safetensors", ".gguf", ".onnx", ".data")
                   and p.name not in ("report.json", "manifest.json"))
    assert "plan.json" in files and any(f.endswith(".gguf") for f in files) == (target[1] == "gguf")
    assert any(f.endswith(".onnx.data") for f in files) == (target[1] == "onnx")
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
    assert whole["params"] == streamed["params"]
    assert whole["perplexity"]["dense"] == streamed["perplexity"]["dense"]
    assert whole["perplexity"]["pruned"] == streamed["perplexity"]["pruned"]
    if target[1] == "gguf":
        assert whole["gguf"]["parity"] == streamed["gguf"]["parity"]
    if target[1] == "onnx":  # the same, but for the greedy generation, not made from a streamed model
        generated = ("greedy_identical", "greedy_first_difference", "greedy_not_compared")
        assert whole["onnx"]["parity"]["greedy_identical"] is not None
        assert streamed["onnx"]["parity"]["greedy_not_compared"]
        assert ({k: v for k, v in whole["onnx"]["parity"].items() if k not in generated}
                == {k: v for k, v in streamed["onnx"]["parity"].items() if k not in generated})
    reloaded = load_model(str(tmp_path / "whole" / "model")).model.state_dict()
    assert streamed["reload"]["tensors_checked"] == len(reloaded) - tied  # a tied lm_head is not stored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"]


def test_streamed_models_read_the_generation_config(tiny_model_dir, tmp_path):
    """generation_config.json's end-of-sequence ids (more than config.json's, as instruct models
    list) reach a streamed model and a reloaded checkpoint, as from_pretrained reads them."""
    import shutil

    from mosaic_export.model.checkpoint import load_resized, save_checkpoint

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    whole = load_model(str(folder))
    assert whole.model.generation_config.eos_token_id == [2, 7]
    assert load_model(str(folder), stream=True).model.generation_config.eos_token_id == [2, 7]
    save_checkpoint(whole, tmp_path / "ck")
    assert load_resized(tmp_path / "ck").model.generation_config.eos_token_id == [2, 7]
    assert load_model(str(tmp_path / "ck"), stream=True).model.generation_config.eos_token_id == [2, 7]


def test_streamed_model_holds_no_layer_until_read(tiny_model_dir):
    """Opened streamed, only the final norm is in memory; a layer read from the source equals the
    whole load's, and goes back to meta when let go; the tables are read in chunks of rows, and
    the embedding only at the rows used."""
    whole = load_model(str(tiny_model_dir))
    streamed = load_model(str(tiny_model_dir), stream=True)
    model, layers = streamed.model, streamed.spec.layer_list(streamed.model)
    assert all(p.is_meta for p in layers.parameters()) and model.get_input_embeddings().weight.is_meta
    assert not model.get_submodule(streamed.spec.final_norm).weight.is_meta
    assert streamed.shape == whole.shape and streamed.layer_dims == whole.layer_dims
    from mosaic_export.model.weights import table_chunks

    table = whole.model.get_input_embeddings().weight
    chunks = list(table_chunks(model, streamed.weights, "output"))  # tied: the embedding's rows
    assert [first for first, _ in chunks] == [0]  # the tiny table is one chunk
    assert torch.equal(torch.cat([rows for _, rows in chunks]), table)
    ids = torch.tensor([[5, 3, 5], [300, 3, 7]])
    model.get_input_embeddings().padding_idx = 310  # a pad id past the rows held: no matter
    with streamed.weights.embedding_rows(ids) as renumbered:  # only the rows these ids use
        assert model.get_input_embeddings().weight.shape == (4, table.shape[1])
        assert torch.equal(model.get_input_embeddings()(renumbered), table[ids])
    assert model.get_input_embeddings().weight.is_meta and model.get_output_embeddings().weight.is_meta
    with streamed.weights.held([(1, layers[1])]):
        ours = layers[1].state_dict()
        for name, value in whole.spec.layer_list(whole.model)[1].state_dict().items():
            assert torch.equal(ours[name], value), name
    assert all(p.is_meta for p in layers.parameters())


def test_gguf_source_equals_the_whole_conversion():
    """The built-in GGUF read tensor by tensor (dequantized, q and k un-permuted) gives exactly
    the weights transformers' whole-file conversion gives."""
    from mosaic_export.model.weights import GGUFSource, skeleton

    whole = load_model()
    source = GGUFSource(whole.gguf_file, skeleton(whole.model.config))
    state = whole.model.state_dict()
    assert set(source.names()) == set(state) - {"lm_head.weight"}
    for name in source.names():
        assert torch.equal(source.get(name), state[name]), name
    table = state["model.embed_tokens.weight"]  # rows read alone, dequantized alone
    assert torch.equal(source.rows("model.embed_tokens.weight", 100, 1000), table[100:1000])


def test_max_rss_below_the_need_is_refused_at_the_door(tiny_model_dir, tmp_path, capsys):
    from mosaic_export.cli import main

    base = ["--model", str(tiny_model_dir), "--sparsity", "0.3", "--calib-seq-len", "64", "--eval-seq-len",
            "64", "--target", "none", "--out", str(tmp_path / "out")]
    assert main([*base, "--max-rss", "64MiB"]) == 2
    err = capsys.readouterr().err
    assert "--max-rss 64.0 MiB is less than this run needs, about" in err
    assert "a calibration pass over one layer" in err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert main([*base, "--stream", "--calib-text", "self"]) == 2
    assert "--stream does not work with --calib-text self" in capsys.readouterr().err
    assert main(["sweep", "--model", str(tiny_model_dir), "--stream", "--out", str(tmp_path / "s")]) == 2
    assert "a sweep does not stream yet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_reload_shapes_finds_a_missing_weight(tiny_model_dir, tmp_path):
    """A streamed run's check of its written checkpoint: every weight there once, at its shape."""
    from safetensors.torch import load_file, save_file

    from mosaic_export.model.checkpoint import reload_shapes, save_checkpoint

    loaded = load_model(str(tiny_model_dir))
    save_checkpoint(loaded, tmp_path / "ck")
    assert reload_shapes(loaded, tmp_path / "ck")["tensors_checked"] == len(loaded.model.state_dict()) - 1
    shard = tmp_path / "ck" / "model-00002-of-00004.safetensors"
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard)
    with pytest.raises(RuntimeError, match=f"does not hold the resized model: {dropped}"):
        reload_shapes(loaded, tmp_path / "ck")


def test_perplexity_over_table_chunks_equals_the_whole_softmax(tiny_model_dir, monkeypatch):
    """Scored a few rows of the output table at a time (the log-sum-exp carried from chunk to
    chunk), perplexity and top-1 are those of the whole logits; streamed, the same figures."""
    import math

    import torch.nn.functional as F

    from mosaic_export.method.evaluate import perplexity
    from mosaic_export.model import weights

    monkeypatch.setattr(weights, "TABLE_CHUNK", 64 * 4 * 50)  # 50 rows of the 320 (hidden 64)
    whole = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = whole.model(input_ids=ids).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    top1 = (logits.argmax(-1) == ids[:, 1:]).float().mean()
    ours = perplexity(whole.model, ids, "t", batch_size=2, logits_chunk=16)
    assert ours.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert ours.top1 == pytest.approx(top1.item()) and ours.n_predicted == 3 * 39
    streamed = load_model(str(tiny_model_dir), stream=True)
    assert perplexity(streamed.model, ids, "t", batch_size=2, logits_chunk=16, streamed=streamed) == ours


def test_spilled_states_are_a_list_on_disk(tmp_path):
    from mosaic_export.method.calibration import SpilledStates

    states = SpilledStates(tmp_path)
    values = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
    for v in values:
        states.append(v)
    folder = states.folder
    assert len(states) == 2 and len(list(folder.iterdir())) == 2
    assert all(torch.equal(a, b) for a, b in zip(states, values, strict=True))
    states[1] = values[1] * 2
    assert torch.equal(states[1], values[1] * 2) and torch.equal(states[0], values[0])
    states[0] = values[0].bfloat16()  # --calib-states bfloat16: its bytes as they are
    assert states[0].dtype == torch.bfloat16 and torch.equal(states[0], values[0].bfloat16())
    assert (folder / "0.bin").stat().st_size == values[0].numel() * 2
    del states
    assert not folder.exists()


def test_a_pass_stopped_early_lets_its_layer_go(tiny_model_dir):
    from mosaic_export.method.calibration import LayerStream

    streamed = load_model(str(tiny_model_dir), stream=True)
    stream = LayerStream(streamed.model, streamed.spec, torch.tensor([[1, 2, 3]]), 1, streamed.weights)
    for _, layer in stream.layers("test"):
        assert not any(p.is_meta for p in layer.parameters())
        break
    stream_layers = streamed.spec.layer_list(streamed.model)
    del stream
    assert all(p.is_meta for p in stream_layers.parameters())
