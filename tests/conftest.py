"""Shared fixtures: a tiny random Llama model with a real (trained) byte-level BPE tokenizer,
saved as an ordinary Hugging Face folder, so the whole pipeline runs on it in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mosaic_export.core.texts import builtin_text

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True, rms_norm_eps=1e-5)


def tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([builtin_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    # Random init is nearly isotropic; give columns different scales so scores differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(torch.rand(p.shape[1]).mul(2).add(0.1))
    return model


REAL_POLICIES: dict = {}  # the product's rounds policies, kept by one_round


# A profile for ONNX fp32 with a closed-form calibration: no runtime overheads, weights resident
# once, 1 GB/s. Not local: the verdicts are the predictions'.
PROFILE = """name = "tiny-device"
[device]
memory = "8GiB"
memory_bandwidth = "1GB/s"
compute = "10GFLOPS"
threads = 2
[runtime]
target = "onnx"
dtype = "fp32"
[budgets]
context = 64
[calibration."onnx:fp32"]
decode_overhead = "0s"
bandwidth = "1GB/s"
prefill_overhead = "0s"
prefill_compute = "10GFLOPS"
memory_base = "0B"
memory_per_weight_byte = 1.0
"""


@pytest.fixture(scope="session")
def profile(tmp_path_factory) -> Path:
    """PROFILE as a file (the tiny device the budget, joint, sweep and replay tests run for)."""
    path = tmp_path_factory.mktemp("profile") / "tiny.toml"
    path.write_text(PROFILE)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_round():
    """Runs on tiny models in this process measure one round (no time cap), in module-scoped
    fixtures too: the rounds, their intervals and verdicts are what tests/unit/test_measure.py
    tests, with injected series, and the integration tests run the CLI in subprocesses with the
    real defaults. A test marked ``real_rounds`` gets the real policies back (real_rounds)."""
    from dataclasses import replace

    from mosaic_export.measure import rounds
    from mosaic_export.run import detect

    patch = pytest.MonkeyPatch()
    for module, name in ((rounds, "VERDICT_POLICY"), (rounds, "BENCH_POLICY"), (rounds, "JOINT_POLICY"),
                         (detect, "POLICY")):
        REAL_POLICIES[module, name] = getattr(module, name)
        patch.setattr(module, name, replace(getattr(module, name), least=1, max_seconds=0.0))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def real_rounds(request, monkeypatch):
    """The product's rounds policies for a test marked ``real_rounds``."""
    if request.node.get_closest_marker("real_rounds"):
        for (module, name), policy in REAL_POLICIES.items():
            monkeypatch.setattr(module, name, policy)


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_folder(tmp_path_factory):
    """GGUF conversions (mosaic_export/gguf_cache.py) cached for this session only, not in the
    home folder; the CLI's child processes inherit the setting."""
    from mosaic_export.model.gguf_cache import ENV

    patch = pytest.MonkeyPatch()
    patch.setenv(ENV, str(tmp_path_factory.mktemp("gguf-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder (config.json, model.safetensors, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(folder)
    return folder


def heterogeneous_model(tiny_model_dir):
    """The tiny model with layers of different head counts and MLP widths."""
    from mosaic_export.model.load import load_model
    from mosaic_export.model.resize import resize_layer

    loaded = load_model(str(tiny_model_dir))
    layers = loaded.spec.layer_list(loaded.model)
    # layer 0: one KV group of 2 heads, 64 channels; layer 2: 2 groups of 1 head, 32 channels
    resize_layer(layers[0], loaded.spec, 16, [2, 3], [1], list(range(0, 96, 3)) + list(range(1, 96, 3)))
    resize_layer(layers[2], loaded.spec, 16, [0, 3], [0, 1], list(range(32)))
    assert [(d.n_head, d.n_kv, d.n_ff) for d in loaded.layer_dims] == [(2, 1, 64), (4, 2, 96), (2, 2, 32)]
    return loaded
