"""Deployable OUT on tiny random models: manifest, app README, verify and run (GGUF and ONNX)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil

import pytest
import torch

from mosaic_export.bundle.deploy import finalize, write_manifest
from mosaic_export.bundle.files import MANIFEST
from mosaic_export.bundle.verify import verify
from mosaic_export.cli import main
from mosaic_export.core.errors import UserError
from mosaic_export.decide.profile import load_profile
from mosaic_export.method.plan import LayerPlan, Plan, PruneSettings
from mosaic_export.model.checkpoint import save_checkpoint
from mosaic_export.model.load import load_model
from mosaic_export.model.names import PROJECTIONS
from mosaic_export.run.generate import generate
from mosaic_export.targets.gguf.runner import next_token_agreement
from mosaic_export.targets.gguf.writer import export as export_gguf
from mosaic_export.targets.gguf.writer import gguf_arch
from mosaic_export.targets.onnx.writer import export as export_onnx
from mosaic_export.targets.onnx.writer import parity as onnx_parity
from tests.conftest import heterogeneous_model

IDS = torch.randint(0, 320, (48,), generator=torch.Generator().manual_seed(0))
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} answer:{% endif %}")
LAYERS = [dict(n_head=2, n_kv=1, n_ff=64), dict(n_head=4, n_kv=2, n_ff=96),
          dict(n_head=2, n_kv=2, n_ff=32)]  # heterogeneous_model's


def _plan(loaded) -> Plan:
    """heterogeneous_model's sizes as a plan (only its sizes matter here)."""
    zero = {p: 0.0 for p in PROJECTIONS}
    layers = [LayerPlan([2, 3], [1], list(range(64)), zero),
              LayerPlan([0, 1, 2, 3], [0, 1], list(range(96)), zero),
              LayerPlan([0, 3], [0, 1], list(range(32)), zero)]
    return Plan({"source": "tiny", "shape": loaded.shape.to_dict()}, PruneSettings(), {}, layers)


def _report(source) -> dict:
    profile = load_profile("laptop-cpu")
    return {"model": {"source": str(source)}, "profile": profile.to_dict(),
            "budgets": dataclasses.asdict(profile.budgets),
            "cost": {"predicted": {"memory_bytes": 3e6, "decode_tokens_per_s": 900.0, "context": 128},
                     "measured": {"memory_bytes": 4e6, "ttft_s": "n/a"}}}


def _out(loaded, folder, target: str | None):
    """OUT as the pipeline writes it: checkpoint, runtime file, report.json, README, manifest."""
    folder.mkdir()
    save_checkpoint(loaded, folder / "model")
    report = _report(loaded.source)
    if target == "gguf":
        export_gguf(loaded, folder / "model-F32.gguf", "F32")
        parity = next_token_agreement(loaded.model, folder / "model-F32.gguf", IDS, threads=1)
        report["format"] = {"target": "gguf", "type": "F32"}
        report["gguf"] = {"file": "model-F32.gguf", "arch": gguf_arch(loaded), "type": "F32",
                          "parity": parity}
        _plan(loaded).save(folder / "plan.json")  # the ONNX OUT takes its sizes from the checkpoint
    elif target == "onnx":
        export_onnx(loaded, folder / "onnx-fp32", "fp32")
        parity = onnx_parity(loaded, folder / "onnx-fp32", IDS, gen_tokens=8, threads=1)
        report["format"] = {"target": "onnx", "type": "fp32"}
        report["onnx"] = {"folder": "onnx-fp32", "dtype": "fp32", "opset": 17,
                          "provider": "CPUExecutionProvider", "parity": parity}
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return folder, report, finalize(folder, report, IDS.tolist() if target else None)


@pytest.fixture(scope="module")
def outs(tiny_model_dir, tmp_path_factory):
    loaded = heterogeneous_model(tiny_model_dir)
    loaded.tokenizer.chat_template = TEMPLATE
    root = tmp_path_factory.mktemp("deploy")
    return {target: _out(loaded, root / str(target), target) for target in ("gguf", "onnx", None)}


def _copy(outs, target, tmp_path):
    shutil.copytree(outs[target][0], tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("target", ["gguf", "onnx", None])
def test_manifest_lists_every_file(outs, target):
    folder, _, manifest = outs[target]
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == set(files) - {MANIFEST} and "README.md" in files
    for name, entry in manifest["files"].items():
        data = files[name].read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert json.loads((folder / MANIFEST).read_text()) == manifest
    assert manifest["layers"] == LAYERS  # from plan.json (gguf) or the checkpoint's config
    assert manifest["budgets"]["context"] == load_profile("laptop-cpu").budgets.context
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["mosaic-export"]
    fmt = manifest["format"]
    assert fmt["target"] == target
    if target is None:
        assert fmt["model_path"] is None and manifest["parity"] == {"ids": None}
        return
    assert manifest["parity"]["ids"] == IDS.tolist() and manifest["parity"]["top1_agreement"] == 1.0
    assert (folder / fmt["model_path"]).is_file()
    assert fmt["model_path"] == {"gguf": "model-F32.gguf", "onnx": "onnx-fp32/model.onnx"}[target]


def test_same_inputs_give_the_same_bytes(outs, tmp_path):
    folder = _copy(outs, "gguf", tmp_path)
    before = {n: (folder / n).read_bytes() for n in (MANIFEST, "README.md")}
    finalize(folder, outs["gguf"][1], IDS.tolist())
    assert {n: (folder / n).read_bytes() for n in before} == before
    write_manifest(folder, outs["gguf"][1], IDS.tolist())
    assert (folder / MANIFEST).read_bytes() == before[MANIFEST]


def test_readme(outs, tmp_path, monkeypatch, capsys):
    gguf = (outs["gguf"][0] / "README.md").read_text()
    assert "llama-cli -m model-F32.gguf -cnv" in gguf and "create_chat_completion" in gguf
    assert "| 0 | 2 | 1 | 64 |" in gguf and "| 2 | 2 | 2 | 32 |" in gguf
    assert re.search(r"\| peak memory \| <= [\d.]+ \w+ \| 2\.9 MiB \| 3\.8 MiB \|", gguf)
    assert "tokens/s | >= 30.0 | 900.0 | - |" in gguf and "128 tokens of context" in gguf
    assert "time to first token" not in gguf  # no budget, and "n/a" is not a figure
    assert "mosaic-export verify ." in gguf
    onnx = (outs["onnx"][0] / "README.md").read_text()
    assert "past_key_values.{i}.key" in onnx and 'mosaic-export run . --prompt "Hello"' in onnx
    # its layers' KV heads differ: no GenAI snippet, and the reason; the onnxruntime snippet runs
    # as written, from inside OUT
    assert "GenAI" in onnx and "--kv-heads keep" in onnx and "onnxruntime_genai" not in onnx
    code = re.search(r"```python\n(.*?)```", onnx, re.S).group(1)
    monkeypatch.chdir(outs["onnx"][0])
    exec(compile(code, "README.md", "exec"), {})
    assert isinstance(capsys.readouterr().out, str)
    assert "--target none" in (outs[None][0] / "README.md").read_text()


@pytest.mark.parametrize("target", ["gguf", "onnx", None])
def test_verify_passes(outs, target, capsys):
    lines = []
    result = verify(outs[target][0], threads=1, log=lines.append)
    assert result["files"] == len(outs[target][2]["files"]) and len(lines) == 2
    if target:
        assert result["parity"]["top1_agreement"] == 1.0
    assert main(["verify", str(outs[target][0]), "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


@pytest.mark.parametrize("target", ["gguf", "onnx"])
def test_verify_streams_the_checkpoint(outs, target):
    """verify --stream reads the resized checkpoint a layer at a time (a model bigger than memory):
    the same logits figures as the whole load; ONNX's greedy generation is not compared then."""
    whole = verify(outs[target][0], threads=1, log=lambda _: None)["parity"]
    lines = []
    streamed = verify(outs[target][0], threads=1, log=lines.append, stream=True)["parity"]
    assert "parity: the checkpoint read a layer at a time" in lines
    for key in ("top1_agreement", "max_abs_logit_diff", "positions"):
        assert streamed[key] == whole[key], key
    assert (streamed.get("greedy_not_compared") is not None) == (target == "onnx")


@pytest.mark.parametrize("damage, message", [
    ("flip", "model-F32.gguf has changed: its sha256 differs"),
    ("stray", "notes.txt is not in the manifest"),
    ("missing", "plan.json is missing"),
    ("version", "manifest version 2 is not supported"),
])
def test_verify_fails(outs, tmp_path, capsys, damage, message):
    folder = _copy(outs, "gguf", tmp_path)
    if damage == "flip":
        path = folder / "model-F32.gguf"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(data)
    elif damage == "stray":
        (folder / "notes.txt").write_text("hello\n")
    elif damage == "missing":
        (folder / "plan.json").unlink()
    else:
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "manifest_version": 2}))
    with pytest.raises(UserError, match=re.escape(message)):
        verify(folder, threads=1, log=lambda _: None)
    assert main(["verify", str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_verify_reruns_parity(outs, tmp_path):
    """A checkpoint changed after the build, with a manifest written over it: the checksums
    pass, parity does not."""
    folder = _copy(outs, "onnx", tmp_path)
    loaded = load_model(str(folder / "model"))
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight.add_(0.05)
    save_checkpoint(loaded, folder / "model")
    write_manifest(folder, outs["onnx"][1], IDS.tolist())
    with pytest.raises(UserError, match=r"max \|logit difference\| to PyTorch .* > 0\.005"):
        verify(folder, threads=1, log=lambda _: None)


def test_generate_is_deterministic(outs, capsys):
    for chat in (True, False):  # with the chat template, and plain
        texts = {}
        for target in ("gguf", "onnx"):
            texts[target] = generate(outs[target][0], "The function", max_tokens=8, chat=chat, threads=1)
            assert isinstance(texts[target], str) and texts[target]
            again = generate(outs[target][0], "The function", max_tokens=8, chat=chat, threads=1)
            assert again == texts[target]
        assert texts["gguf"] == texts["onnx"]  # one model (F32, fp32), two runtimes, same template
    for target in ("gguf", "onnx"):
        assert main(["run", str(outs[target][0]), "--prompt", "The function", "--max-tokens", "8",
                     "--no-chat", "--threads", "1"]) == 0
        assert capsys.readouterr().out == texts[target] + "\n"


def test_door_checks(outs, tmp_path, capsys):
    cases = [(["run", str(tmp_path / "nowhere"), "--prompt", "x"], "no such output folder"),
             (["verify", str(tmp_path)], "no manifest.json"),
             (["run", str(outs[None][0]), "--prompt", "x"], "holds only the PyTorch checkpoint"),
             (["run", str(outs["gguf"][0]), "--prompt", "x", "--max-tokens", "0"],
              "--max-tokens must be positive")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    folder = _copy(outs, "onnx", tmp_path)
    shutil.rmtree(folder / "onnx-fp32")
    assert main(["run", str(folder), "--prompt", "x"]) == 2
    assert "the runtime file onnx-fp32/model.onnx is missing" in capsys.readouterr().err


def test_chat_probe_asks_each_question_as_run_does(outs):
    """The probe's one-load batch of questions gives each the reply `run` gives it alone."""
    from chat_probe import probe_gguf  # tools/chat_probe.py

    from mosaic_export.method.chat_probe import QUESTIONS

    folder = outs["gguf"][0]
    result = probe_gguf(folder / "model-F32.gguf", threads=1, max_tokens=6)
    assert result["questions"] == len(QUESTIONS) == len(result["rows"])
    assert result["answered"] == sum(r["answered"] for r in result["rows"])
    for i in (0, 7, 19):
        alone = generate(folder, QUESTIONS[i][0], max_tokens=6, chat=True, threads=1)
        assert result["rows"][i]["reply"] == alone
