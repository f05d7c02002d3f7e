"""Every registered architecture end to end on a tiny random model: prune heads and channels
(layers of different sizes), save, reload, ONNX against PyTorch; GGUF in llama.cpp against
PyTorch, or the refusal at the door where llama.cpp cannot hold layers of different sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mosaic_export.cli import main
from mosaic_export.model.arch import LayerDims
from mosaic_export.model.fused import UNFUSED_AS
from mosaic_export.model.load import load_model
from mosaic_export.model.resize import leading, resize_model
from mosaic_export.targets.gguf.runner import _llama
from mosaic_export.targets.gguf.writer import export as export_gguf
from mosaic_export.targets.gguf.writer import gguf_arch
from tests.conftest import TINY, tiny_tokenizer

# Each architecture's tiny config: what sets it apart from Llama is switched on.
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's pattern
ARCHS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),  # q/k norms
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(  # 4 norms, GELU, windows
        head_dim=16, num_hidden_layers=6, layer_types=GEMMA3_LAYERS, sliding_window=24,
        query_pre_attn_scalar=16, rope_local_base_freq=10000.0, rope_theta=1e6,
        final_logit_softcapping=None, attn_logit_softcapping=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(  # fused qkv and gate_up, split on load
        pad_token_id=0, bos_token_id=1, eos_token_id=0)),
}
FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2", "--eval-seq-len", "64",
        "--align", "1", "--sparsity", "0.4", "--structured-fraction", "0.5"]
IDS = torch.randint(0, TINY["vocab_size"], (48,), generator=torch.Generator().manual_seed(0))


def tiny_arch_model(arch: str):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # columns of different scales; norms and biases away from their init
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(torch.rand(p.shape[1]).mul(2).add(0.1))
            elif p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_dir(request, tmp_path_factory):
    # not named after the architecture: llama.cpp reads a Phi-3 end-of-turn token from the vocabulary
    # of any model whose general.name (the folder's name) says "phi3", and the tiny one has none
    folder = tmp_path_factory.mktemp("tiny")
    tiny_arch_model(request.param).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(folder)
    return request.param, folder


def _torch_logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(input_ids=ids[None]).logits[0].numpy()


def test_prune_reload_and_onnx(arch_dir, tmp_path):
    arch, folder = arch_dir
    out = tmp_path / "out"
    assert main(["--model", str(folder), *FAST, "--target", "onnx", "--dtype", "fp32",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["reload"]["max_abs_logit_diff"] < 1e-4
    onnx = report["onnx"]["parity"]
    assert onnx["max_abs_logit_diff"] < 1e-3 and onnx["greedy_identical"]
    loaded = load_model(str(out / "model"))
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert loaded.shape.model_type == UNFUSED_AS.get(model_type, model_type)
    assert len(set(loaded.layer_dims)) > 1  # layers of different sizes
    assert loaded.layer_dims != [loaded.shape.dense_dims] * loaded.shape.n_layers


def test_gguf_matches_pytorch_or_refuses_at_the_door(arch_dir, tmp_path, capsys):
    arch, folder = arch_dir
    dense = load_model(str(folder))
    out = tmp_path / "out"
    code = main(["--model", str(folder), *FAST, "--target", "gguf", "--quant", "F32",
                 "--out", str(out)])
    if dense.spec.gguf_per_layer is None:  # refused before pruning, nothing written
        assert code == 2 and not out.exists()
        assert "--allocation uniform" in capsys.readouterr().err
        # one size for every layer is what llama.cpp can load: the first groups and channels kept
        resize_model(dense, [leading(d, LayerDims(2, 1, 64)) for d in dense.layer_dims])
    else:
        assert code == 0
        report = json.loads((out / "report.json").read_text())
        assert report["gguf"]["arch"] == "deci" and report["gguf"]["parity"]["top1_agreement"] >= 0.99
        # every kind of removal: a KV group with its heads, query heads in each group, channels
        sizes = [LayerDims(2, 1, 64), LayerDims(4, 2, 96), LayerDims(2, 2, 32)]
        resize_model(dense, [leading(d, s) for d, s in zip(dense.layer_dims, sizes, strict=True)])
    path = tmp_path / "m.gguf"
    export_gguf(dense, path, "F32")
    llm = _llama(path, len(IDS), threads=1, logits_all=True)
    llm.eval([int(t) for t in IDS])
    got = np.asarray(llm.scores[: len(IDS)])
    ref = _torch_logits(dense, IDS)
    assert gguf_arch(dense) == ("deci" if dense.spec.gguf_per_layer else arch)  # qwen2: always deci
    assert np.abs(got - ref).max() < 2e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


def test_uniform_allocation_gives_one_size_per_layer(tmp_path):
    folder = tmp_path / "gemma"
    tiny_arch_model("gemma3").save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["--model", str(folder), *FAST, "--allocation", "uniform", "--target", "gguf",
                 "--quant", "F32", "--out", str(out)]) == 0
    loaded = load_model(str(out / "model"))
    assert len(set(loaded.layer_dims)) == 1 and loaded.layer_dims[0] != loaded.shape.dense_dims
    assert json.loads((out / "report.json").read_text())["gguf"]["arch"] == "gemma3"


def test_fused_projections_split_on_load_compute_the_same(tmp_path):
    phi3 = tiny_arch_model("phi3")
    phi3.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "MistralForCausalLM"
    assert loaded.spec.projection(loaded.spec.layer_list(loaded.model)[0], "k").out_features == 32
    with torch.no_grad():
        ref = phi3(input_ids=IDS[None]).logits[0].numpy()
    assert np.abs(_torch_logits(loaded, IDS) - ref).max() < 1e-5


def test_layer_stream_gives_each_kind_of_layer_its_own_mask():
    """Calibration runs layer by layer on inputs captured once: Gemma's full-attention layers must
    get their own mask, not the sliding layers' (64 tokens, window 24)."""
    from mosaic_export.method.calibration import LayerStream
    from mosaic_export.model.arch import arch_for

    model = tiny_arch_model("gemma3")
    ids = torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    stream = LayerStream(model, arch_for("gemma3_text"), ids, batch_size=1)
    assert sorted(stream.kwargs, key=str) == ["full_attention", "sliding_attention"]
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i, layer in enumerate(model.model.layers[:-1]):  # the last output is after the final norm
        stream.advance(layer)
        assert torch.allclose(torch.cat(stream.hidden), want[i + 1], atol=1e-4), i


# What the main configs leave at their defaults: a score scale other than 1/sqrt(head_dim), one
# window for all of Mistral's layers, Qwen2's window from layer 1 on; ONNX computes each (64
# tokens, window 24); llama.cpp's Gemma 3 fixes the scale, so GGUF refuses that one.
VARIANTS = [("gemma3", dict(query_pre_attn_scalar=24)), ("mistral", dict(sliding_window=24)),
            ("qwen2", dict(use_sliding_window=True, sliding_window=24, max_window_layers=1))]


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_onnx_computes_config_variants(tmp_path, arch, overrides):
    from mosaic_export.targets.onnx.runner import OnnxDecoder
    from mosaic_export.targets.onnx.writer import export as export_onnx

    config_cls, model_cls, extra = ARCHS[arch]
    ARCHS[arch] = (config_cls, model_cls, {**extra, **overrides})
    try:
        model = tiny_arch_model(arch)
    finally:
        ARCHS[arch] = (config_cls, model_cls, extra)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    resize_model(loaded, [leading(d, LayerDims(2, 1, 64)) for d in loaded.layer_dims])
    ids = torch.randint(0, TINY["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(2))
    decoder = OnnxDecoder(export_onnx(loaded, tmp_path / "onnx", "fp32").parent, threads=1)
    logits, _ = decoder.forward(ids.numpy(), decoder.empty_past())
    assert np.abs(logits[0] - _torch_logits(loaded, ids[0])).max() < 1e-4
    # with the cache past the window: a chunk, then token by token
    first, past = decoder.forward(ids[:, :40].numpy(), decoder.empty_past())
    steps = [first]
    for t in range(40, 64):
        step, past = decoder.forward(ids[:, t:t + 1].numpy(), past)
        steps.append(step)
    assert np.abs(np.concatenate(steps, 1) - logits).max() < 1e-4
    if arch == "gemma3":
        from mosaic_export.core.errors import UserError
        from mosaic_export.targets.gguf.writer import check_exportable

        with pytest.raises(UserError, match="query_pre_attn_scalar"):
            check_exportable(loaded)


def test_an_activation_the_exporters_do_not_compute_is_refused(tmp_path):
    from mosaic_export.core.errors import UserError
    from mosaic_export.targets.gguf.writer import check_exportable as gguf_check
    from mosaic_export.targets.onnx.graph import check_exportable as onnx_check
    from tests.conftest import tiny_model

    tiny_model(hidden_act="gelu").save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    for check in (gguf_check, onnx_check):
        with pytest.raises(UserError, match="activation gelu"):
            check(loaded)
