"""Bad input the user hands in: a broken model folder, numbers out of range, a broken manifest.

Each ends with one line on stderr, exit code 2 and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mosaic_export.cli import main
from mosaic_export.core.errors import UserError
from mosaic_export.model.checkpoint import load_resized, save_checkpoint
from mosaic_export.model.load import load_model
from tests.conftest import tiny_model

FAST = ["--sparsity", "0.3", "--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2",
        "--eval-seq-len", "64", "--align", "1", "--target", "none"]
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _bad(tmp_path, capsys, *args, match: str, command=()):
    """The command with FAST first (the flags under test come later and win) fails cleanly."""
    out = tmp_path / "out"
    code = main([*command, *FAST, *map(str, args), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("mosaic-export: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- 1. the model folder ---------------------------------------------------------------------------


def test_truncated_safetensors(model_copy, tmp_path, capsys):
    _truncate(model_copy / "model.safetensors")
    _bad(tmp_path, capsys, "--model", model_copy,
         match=f"{model_copy}/model.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "3"])
def test_config_not_an_object(model_copy, tmp_path, capsys, content):
    (model_copy / "config.json").write_text(content)
    _bad(tmp_path, capsys, "--model", model_copy,
         match=f"{model_copy}/config.json: expected a JSON object")


@pytest.mark.parametrize("key, value", [("hidden_size", 128), ("intermediate_size", 64),
                                        ("num_hidden_layers", 4), ("num_hidden_layers", 2)])
def test_config_does_not_match_weights(model_copy, tmp_path, capsys, key, value):
    config = json.loads((model_copy / "config.json").read_text())
    config[key] = value
    (model_copy / "config.json").write_text(json.dumps(config))
    _bad(tmp_path, capsys, "--model", model_copy, match="weights do not match config.json: ")


def test_no_tokenizer(model_copy, tmp_path, capsys):
    for name in TOKENIZER:
        (model_copy / name).unlink(missing_ok=True)
    _bad(tmp_path, capsys, "--model", model_copy,
         match=f"{model_copy}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")


def test_pickle_weights_are_never_loaded(model_copy, tmp_path, capsys):
    """A .bin beside an unrelated .safetensors file: transformers would unpickle the .bin."""
    from safetensors.torch import save_file

    state = dict(tiny_model().state_dict())
    state.pop("lm_head.weight")  # tied
    torch.save(state, model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    save_file({"x": torch.zeros(2)}, model_copy / "adapter.safetensors")
    _bad(tmp_path, capsys, "--model", model_copy,
         match=f"no weights (model.safetensors or model.safetensors.index.json) in {model_copy}; "
               "only safetensors weights are loaded")


def test_sharded_safetensors_load_and_a_missing_shard_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "sharded"
    tiny_model().save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    for name in TOKENIZER:
        shutil.copy(tiny_model_dir / name, folder / name)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    dense = load_model(str(tiny_model_dir)).model.state_dict()
    loaded = load_model(str(folder)).model.state_dict()
    assert all(torch.equal(dense[k], loaded[k]) for k in dense)
    shards[-1].unlink()
    with pytest.raises(UserError, match=f"{shards[-1].name}: missing"):
        load_model(str(folder))


def test_truncated_resized_checkpoint(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    save_checkpoint(load_model(str(tiny_model_dir)), folder)
    load_resized(folder)  # intact: loads
    _truncate(folder / "model-00002-of-00004.safetensors")  # layer 0's shard
    with pytest.raises(UserError, match="model-00002-of-00004.safetensors: not a readable safetensors file"):
        load_resized(folder)
    _bad(tmp_path, capsys, "--model", folder, match="is a resized checkpoint written by mosaic-export")


# --- 2. numeric options ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, match", [
    (["--eval-seq-len", "0"], "--eval-seq-len must be at least 2 tokens, got 0"),
    (["--eval-seq-len", "1"], "--eval-seq-len must be at least 2 tokens, got 1"),
    (["--threads", "-1"], "--threads must be a positive integer, got -1"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1, got 0"),
    (["--calib-samples", "-3"], "--calib-samples must be at least 1, got -3"),
    (["--calib-seq-len", "1"], "--calib-seq-len must be at least 2 tokens, got 1"),
    (["--align", "0"], "--align must be a positive integer, got 0"),
    (["--align", "-4"], "--align must be a positive integer, got -4"),
    (["--calib-seq-len", "100000"], "--calib-seq-len 100000 is longer than the model's maximum of 256"),
    (["--eval-seq-len", "257"], "--eval-seq-len 257 is longer than the model's maximum of 256"),
])
def test_bad_numbers(tiny_model_dir, tmp_path, capsys, args, match):
    _bad(tmp_path, capsys, "--model", tiny_model_dir, *args, match=match)


def test_align_zero_is_not_the_default(tiny_model_dir, tmp_path, capsys):
    _bad(tmp_path, capsys, "--model", tiny_model_dir, "--target", "gguf", "--quant", "Q8_0", "--align", "0",
         match="--align must be a positive integer, got 0")


def test_long_calibration_in_plan_and_sweep(tiny_model_dir, tmp_path, capsys):
    code = main(["plan", "--model", str(tiny_model_dir), "--sparsity", "0.3", "--calib-seq-len", "300"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--calib-seq-len 300 is longer than the model's maximum of 256" in err
    # the perplexity windows are not used by a dry run: the default 512 is no error there
    assert main(["plan", "--model", str(tiny_model_dir), "--sparsity", "0.3", "--calib-samples", "2",
                 "--calib-seq-len", "64", "--align", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(tiny_model_dir), "--targets", "0", "--target", "onnx",
                 "--calib-seq-len", "300", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--calib-seq-len 300" in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


# --- 3. verify on a broken manifest ----------------------------------------------------------------


@pytest.mark.parametrize("manifest, match", [
    ({"manifest_version": 1}, "manifest.json: missing key 'format'"),
    ({"manifest_version": 1, "format": {"target": None}}, "manifest.json: missing key 'files'"),
    ({"manifest_version": 1, "format": []}, "manifest.json: 'format' has the wrong type (list)"),
    ({"manifest_version": 1, "format": {"target": "gguf"}, "files": {}},
     "manifest.json: format: missing key 'model_path'"),
    ({"manifest_version": 1, "format": {"target": None}, "files": ["a"]},
     "manifest.json: 'files' has the wrong type (list)"),
    ({"manifest_version": 1, "format": {"target": None}, "files": {"a": {"bytes": 1}}},
     "manifest.json: files: a: missing key 'sha256'"),
    ({"manifest_version": 1, "format": {"target": None}, "files": {"a": "x"}},
     "manifest.json: files: a: expected an object, got str"),
    ({"manifest_version": 1, "format": {"target": None}, "files": {}, "parity": {"ids": "12"}},
     "manifest.json: parity: 'ids' is not a list of token ids"),
])
def test_verify_malformed_manifest(tmp_path, capsys, manifest, match):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "a").write_text("a")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{folder}/{match}" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_error_allocation_is_refused_where_it_cannot_work(tiny_model_dir, tmp_path, capsys):
    model = ["--model", str(tiny_model_dir)]
    _bad(tmp_path, capsys, *model, "--allocation", "error", "--structured-fraction", "0.5",
         match="all-unstructured or all-structured plans (--structured-fraction 0 or 1)")
    _bad(tmp_path, capsys, *model, "--allocation", "error", "--structured-fraction", "1",
         "--structured-scores", "magnitude", match="cannot go with --structured-scores magnitude")


def test_a_model_with_removed_blocks_is_not_pruned_again(tiny_model_dir, tmp_path, capsys):
    from tests.unit.test_blocks import blocks_model

    save_checkpoint(blocks_model(tiny_model_dir), tmp_path / "blocks")
    _bad(tmp_path, capsys, "--model", tmp_path / "blocks", match="is a resized checkpoint")
