"""The target registry: a target registered from here runs through the main command, the cost
model, the deployable folder, verify and run, with no other file knowing its name."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mosaic_export import targets
from mosaic_export.cli import main
from mosaic_export.core.errors import UserError
from mosaic_export.decide.costmodel import Calibration, Format, Pricing
from mosaic_export.measure.process import peak_rss_bytes
from mosaic_export.model.checkpoint import load_resized, save_checkpoint
from mosaic_export.model.load import load_model
from mosaic_export.targets.base import Target


class Checkpoint(Target):
    """A safetensors-only target: the resized checkpoint itself, run in PyTorch."""

    name = "checkpoint"
    engine = "PyTorch"
    option = "dtype"
    noun = "checkpoint dtype"
    types = ("fp32",)
    search_types = ("fp32",)
    default_type = "fp32"
    nominal_base = 2**18  # small: the tiny model's weights must matter in the memory budget
    scores_perplexity = False  # its benchmark times the model only

    def kv_bytes_per_value(self, type_):
        return 4

    def tensor_bytes(self, name, rows, cols, type_, matmul, tensor_types):
        return 4 * rows * cols

    def check_exportable(self, loaded):
        pass

    def artifact_name(self, type_):
        return f"checkpoint-{type_}"

    def export(self, loaded, path, type_):
        save_checkpoint(loaded, path)

    @torch.no_grad()
    def benchmark(self, path, prompt_tokens=16, gen_tokens=4, context=64, **options):
        t0 = time.perf_counter()
        model = load_resized(path).model
        load_s = time.perf_counter() - t0
        ids = torch.arange(prompt_tokens)[None] % model.config.vocab_size
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
        return {"file_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")), "load_s": load_s,
                "prefill": {"tokens": prompt_tokens, "seconds": prefill_s,
                            "tokens_per_s": prompt_tokens / prefill_s},
                "decode": {"tokens": gen_tokens, "seconds": decode_s, "tokens_per_s": gen_tokens / decode_s},
                "peak_rss_bytes": peak_rss_bytes(), "context": context}

    def deploy(self, loaded, path, type_, parity_ids, runtime, evaluation, log):
        log(f"writing the checkpoint target to {path.name}")
        self.export(loaded, path, type_)
        parity = self._parity(loaded, path, parity_ids)
        return {"folder": path.name, "dtype": type_, "parity": parity}

    @torch.no_grad()
    def _parity(self, loaded, folder, ids):
        ours = load_resized(folder).model(input_ids=ids[None]).logits[0]
        ref = loaded.model(input_ids=ids[None]).logits[0]
        return {"positions": len(ids), "max_abs_logit_diff": float((ours - ref).abs().max()),
                "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).float().mean())}

    def manifest_format(self, section):
        return {"dtype": section["dtype"], "model_path": f"{section['folder']}/config.json"}

    def verify_parity(self, loaded, path, fmt, ids, recorded, threads):
        return self._parity(loaded, path.parent, ids), 0.99

    @torch.no_grad()
    def generate(self, path, prompt, max_tokens, chat, threads):
        model = load_resized(path.parent)
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        return model.tokenizer.decode(out[0, ids.shape[1]:])

    def readme_run(self, fmt):
        return ["## Run it", "", f"`{fmt['model_path']}`: load its folder with "
                "`mosaic_export.model.load.load_model`.", ""]


PROFILE = """name = "pytorch-device"
[device]
memory = "8GiB"
memory_bandwidth = "1GB/s"
compute = "10GFLOPS"
threads = 2
[runtime]
target = "checkpoint"
dtype = "fp32"
[budgets]
context = 64
"""


@pytest.fixture
def checkpoint_target():
    target = targets.register(Checkpoint())
    yield target
    targets.unregister(target.name)


def test_registered_target_runs_the_main_command(checkpoint_target, tiny_model_dir, tmp_path, capsys):
    profile = tmp_path / "pytorch.toml"
    profile.write_text(PROFILE)
    loaded = load_model(str(tiny_model_dir))
    dense = Pricing(loaded.shape, Format("checkpoint", "fp32"),
                    Calibration.nominal("checkpoint", 1e9, 1e10), 64).cost(
        [loaded.shape.dense_dims] * loaded.shape.n_layers)
    # the cost model prices the target's bytes: every parameter in float32, tied embeddings once
    assert dense.weight_bytes == 4 * sum(p.numel() for p in loaded.model.parameters())
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), "--dtype", "fp32",
                 "--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2",
                 "--eval-seq-len", "64", "--max-memory", f"{int(dense.memory_bytes * 0.9)}B", "--margin", "0",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    section = report["checkpoint"]
    assert report["format"] == {"target": "checkpoint", "type": "fp32"}
    assert section["parity"]["top1_agreement"] == 1.0 and report["cost"]["removed"] > 0
    assert report["cost"]["predicted"]["memory_bytes"] <= 0.9 * dense.memory_bytes
    printed = capsys.readouterr().out
    assert "PyTorch decode tokens/s (1 round)" in printed and "PyTorch peak RSS" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == {"target": "checkpoint", "dtype": "fp32",
                                  "model_path": "checkpoint-fp32/config.json"}
    assert "load its folder with" in (out / "README.md").read_text()
    assert main(["verify", str(out)]) == 0
    assert "agrees with PyTorch on the greedy next token at 100.0%" in capsys.readouterr().out
    assert main(["run", str(out), "--prompt", "The function", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    # a search over types measures each type's perplexity in the runtime: refused at the door
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), "--types", "fp32",
                 "--out", str(tmp_path / "searched")]) == 2
    assert "scores no perplexity" in capsys.readouterr().err and not (tmp_path / "searched").exists()


def test_registry_checks_at_registration(checkpoint_target):
    with pytest.raises(ValueError, match="already registered"):
        targets.register(Checkpoint())

    class BadOption(Checkpoint):
        name, option = "bad", "precision"

    with pytest.raises(ValueError, match="option must be one of"):
        targets.register(BadOption())

    class BadDefault(Checkpoint):
        name, default_type = "bad", "bf16"

    with pytest.raises(ValueError, match="default_type and search_types must be among its types"):
        targets.register(BadDefault())
    with pytest.raises(UserError, match="'tflite' is not supported; supported: gguf, onnx, checkpoint"):
        targets.get("tflite")


def test_builtin_targets():
    assert targets.names() == ("gguf", "onnx")
    gguf, onnx = targets.get("gguf"), targets.get("onnx")
    assert [gguf.alignment(t) for t in ("F16", "Q8_0", "Q4_0", "Q6_K", "Q4_K_M")] == [1, 32, 32, 256, 256]
    assert {onnx.alignment(t) for t in onnx.types} == {1}
    assert gguf.output_rows(512) == 1 and onnx.output_rows(512) == 512
    assert gguf.tied_output_bytes(10, 64, "F16") == 0
    assert {onnx.tied_output_bytes(10, 64, t) for t in onnx.types} == {0}  # one table in every dtype
    # the free-space check counts llama.cpp's F32 input where the export writes one
    assert not gguf.float32_first("F16", {3}) and not gguf.float32_first("Q8_0", {64, 96})
    assert gguf.float32_first("Q8_0", {64, 72}) and gguf.float32_first("Q6_K", {256})
    assert not any(onnx.float32_first(t, {3}) for t in onnx.types)
    assert gguf.streamed_types() == gguf.types and onnx.streamed_types() == onnx.types
    with pytest.raises(UserError, match="GGUF type 'Q3' is not supported"):
        gguf.check_type("Q3")
