from __future__ import annotations

import dataclasses

import pytest

from mosaic_export.core.errors import UserError
from mosaic_export.core.units import parse_bandwidth, parse_bytes, parse_flops, parse_seconds
from mosaic_export.decide.costmodel import Format
from mosaic_export.decide.profile import builtin_names, load_profile

GOOD = """
name = "mine"
[device]
memory = "8GiB"
memory_bandwidth = "68GB/s"
compute = "10TFLOPS"
threads = 6
[runtime]
target = "gguf"
quant = "Q4_K_M"
[budgets]
max_memory = "512MiB"
context = 2048
min_tokens_per_s = 20
max_ttft = "500ms"
"""


def test_units():
    assert parse_bytes("80MiB") == 80 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bandwidth("68GB/s") == 68e9
    assert parse_flops("10TFLOPS") == 1e13
    assert parse_seconds("200ms") == pytest.approx(0.2)
    for bad in ("80", "80 MiBs", "fast", 80):
        with pytest.raises(UserError, match="expected a size"):
            parse_bytes(bad)


def test_builtin_profiles_load():
    assert builtin_names() == ["gpu-server", "jetson-orin", "laptop-cpu"]
    orin = load_profile("jetson-orin")
    assert orin.device.memory_bandwidth == 68e9
    assert orin.runtime.quant == "Q4_K_M" and orin.runtime.format == Format("gguf", "Q4_K_M")
    aligned = {}
    for name in builtin_names():
        fmt = load_profile(name).runtime.format
        aligned[name] = fmt.spec.alignment(fmt.name)
    assert aligned == {"jetson-orin": 256, "laptop-cpu": 32, "gpu-server": 1}


def test_user_profile(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    p = load_profile(str(f))
    assert p.name == "mine" and p.budgets.max_memory_bytes == 512 * 2**20
    assert p.budgets.max_ttft_s == pytest.approx(0.5) and p.budgets.min_tokens_per_s == 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"


@pytest.mark.parametrize("edit, message", [
    (("threads = 6", "thread = 6"), r"mine.toml: unknown key 'device.thread'"),
    (("threads = 6", ""), r"missing key 'device.threads'"),
    (('memory = "8GiB"', 'memory = "8 gigs"'), r"key 'device.memory': expected a size"),
    (('memory = "8GiB"', "memory = 8"), r"key 'device.memory': expected str"),
    (("context = 2048", 'context = "2k"'), r"key 'budgets.context': expected int"),
    (('quant = "Q4_K_M"', 'quant = "Q3"'), r"key 'runtime.quant': expected one of"),
    (('quant = "Q4_K_M"', 'dtype = "fp16"'), r"runtime.dtype is not a key of target 'gguf' "
                                            r"\(it takes runtime.quant\)"),
    (('quant = "Q4_K_M"', ''), r"missing key 'runtime.quant' \(target 'gguf' needs a GGUF type: F32"),
    (('target = "gguf"', 'target = "tflite"'), r"key 'runtime.target': expected one of gguf, onnx"),
    (('max_memory = "512MiB"', 'max_memory = "16GiB"'), r"exceeds device.memory"),
    (("threads = 6", "threads = -1"), r"expected a positive value"),
    (("[budgets]", "[budget]"), r"unknown key 'budget'|missing table \[budgets\]"),
])
def test_bad_profile(tmp_path, edit, message):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD.replace(*edit))
    with pytest.raises(UserError, match=message):
        load_profile(str(f))


def test_unknown_profile_name():
    with pytest.raises(UserError, match="unknown profile 'jetson-nano'.*jetson-orin"):
        load_profile("jetson-nano")
    with pytest.raises(UserError, match="profile file not found"):
        load_profile("nope/missing.toml")
