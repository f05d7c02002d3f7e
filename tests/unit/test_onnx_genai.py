"""ONNX Runtime GenAI loads our ONNX folders: a tiny model whose layers differ in query heads and MLP
width but keep their KV heads (what --kv-heads keep plans), at every dtype."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mosaic_export.cli import main
from mosaic_export.model.load import load_model
from mosaic_export.model.resize import resize_layer
from mosaic_export.targets.onnx import genai as onnx_genai
from mosaic_export.targets.onnx.runner import OnnxDecoder
from mosaic_export.targets.onnx.table import DTYPES
from mosaic_export.targets.onnx.writer import export


def kv_kept_model(tiny_model_dir):
    """Layer 0: 1 query head per KV group (2 of 4 heads), 48 channels; layer 2: 64 channels."""
    loaded = load_model(str(tiny_model_dir))
    layers = loaded.spec.layer_list(loaded.model)
    resize_layer(layers[0], loaded.spec, 16, [0, 2], [0, 1], list(range(0, 96, 2)))
    resize_layer(layers[2], loaded.spec, 16, [0, 1, 2, 3], [0, 1], list(range(64)))
    assert [(d.n_head, d.n_kv, d.n_ff) for d in loaded.layer_dims] == [(2, 2, 48), (4, 2, 96), (4, 2, 64)]
    return loaded


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    loaded = kv_kept_model(tiny_model_dir)
    root = tmp_path_factory.mktemp("genai")
    return loaded, {dtype: export(loaded, root / dtype, dtype).parent for dtype in DTYPES}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_genai_generates_our_runners_greedy_tokens(folders, dtype):
    loaded, found = folders
    config = json.loads((found[dtype] / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    assert config["model"]["decoder"]["num_hidden_layers"] == 3
    prompt = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = OnnxDecoder(found[dtype], threads=1).generate(prompt, 24)
    theirs = onnx_genai.greedy(found[dtype], prompt, 24, threads=1)
    assert len(theirs) == 24 and theirs == ours  # both run the same graph on the same kernels


def test_parity_records_the_genai_check(folders):
    from mosaic_export.targets.onnx.writer import parity

    loaded, found = folders
    ids = torch.randint(0, 320, (48,), generator=torch.Generator().manual_seed(4))
    result = parity(loaded, found["fp32"], ids, gen_tokens=16, prompt_tokens=16, threads=1)
    assert result["genai"]["checked"] and result["genai"]["identical"], result["genai"]


def test_a_genai_disagreement_fails_the_build(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """GenAI's greedy tokens differing from our runner's is a parity failure: exit 2, nothing written."""
    from mosaic_export.targets.onnx import writer as onnx_writer

    real = onnx_writer.logits_and_greedy

    def disagreeing(*args, **kwargs):
        logits, ours, genai = real(*args, **kwargs)
        assert genai["checked"] and genai["identical"]  # the real check passed; now it does not
        return logits, ours, {**genai, "identical": False, "first_difference": 3}

    monkeypatch.setattr(onnx_writer, "logits_and_greedy", disagreeing)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--sparsity", "0.25", "--structured-fraction", "1",
                 "--target", "onnx", "--calib-samples", "2", "--calib-seq-len", "32", "--eval-windows", "1",
                 "--eval-seq-len", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("ONNX Runtime GenAI disagrees with ONNX Runtime on onnx-fp32: its greedy tokens differ from "
            "ours at token 3") in err
    assert not out.exists()


def test_a_genai_stop_short_of_our_tokens_fails_with_its_own_message():
    from mosaic_export.core.errors import UserError
    from mosaic_export.targets.onnx.writer import genai_agrees

    genai_agrees({"checked": False, "reason": "not for GenAI"}, "onnx-fp32", 64)  # nothing to say
    genai_agrees({"checked": True, "identical": True, "tokens": 64, "first_difference": None}, "f", 64)
    with pytest.raises(UserError, match="it stopped after 10 of 64 greedy tokens, without an end-of-seq"):
        genai_agrees({"checked": True, "identical": False, "tokens": 10, "first_difference": None}, "f", 64)


def test_genai_refuses_a_folder_whose_kv_heads_differ(tiny_model_dir, tmp_path):
    from mosaic_export.core.errors import UserError
    from tests.conftest import heterogeneous_model

    folder = export(heterogeneous_model(tiny_model_dir), tmp_path / "het", "fp32").parent
    assert not (folder / "genai_config.json").exists()
    with pytest.raises(UserError, match="--kv-heads keep"):
        onnx_genai.load(folder)


def test_onnx_target_plans_keep_kv_heads_and_the_readme_snippet_runs(tiny_model_dir, tmp_path, monkeypatch,
                                                                    capsys):
    """--target onnx keeps every layer's KV heads by default (heads go within their groups), so the
    folder loads in GenAI; --kv-heads prune may remove whole groups and writes no GenAI config."""
    common = ["--model", str(tiny_model_dir), "--sparsity", "0.4", "--structured-fraction", "1",
              "--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "0", "--target", "onnx"]
    assert main([*common, "--out", str(tmp_path / "keep")]) == 0
    plan = json.loads((tmp_path / "keep" / "plan.json").read_text())
    assert plan["settings"]["keep_kv_heads"] is True
    assert [(len(layer["q_heads"]), len(layer["kv_heads"])) for layer in plan["layers"]] == [(2, 2)] * 3
    report = json.loads((tmp_path / "keep" / "report.json").read_text())
    assert report["onnx"]["genai"] and report["onnx"]["parity"]["genai"]["identical"]
    readme = (tmp_path / "keep" / "README.md").read_text()
    code = re.search(r"```python\n(import onnxruntime_genai.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path / "keep")
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out

    assert main([*common, "--kv-heads", "prune", "--out", str(tmp_path / "prune")]) == 0
    plan = json.loads((tmp_path / "prune" / "plan.json").read_text())
    assert plan["settings"]["keep_kv_heads"] is False
    assert [len(layer["kv_heads"]) for layer in plan["layers"]] == [2, 1, 1]  # the same budget, other heads
    assert not json.loads((tmp_path / "prune" / "report.json").read_text())["onnx"]["genai"]


def test_agreement_allows_only_a_stop_at_an_end_of_sequence_token():
    eos = [9]
    assert onnx_genai.agrees([1, 2, 3], [1, 2, 3], eos)
    assert onnx_genai.agrees([1, 9, 3], [1, 9], eos)  # GenAI stopped at eos; ours went on
    assert not onnx_genai.agrees([1, 2, 3], [1, 2], eos)  # stopped early without eos
    assert not onnx_genai.agrees([1, 2], [], eos)
    assert not onnx_genai.agrees([1, 2, 3], [1, 4, 3], eos)
