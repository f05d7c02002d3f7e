"""Cost model, budget search and profile budgets: exact weight bytes against real exports, the
calibration fit, and the search's choices on a cost known in closed form."""

from __future__ import annotations

import dataclasses

import gguf
import onnx
import pytest
import torch
from onnx import numpy_helper

from mosaic_export.core.errors import UserError
from mosaic_export.decide.costmodel import (
    Calibration,
    Format,
    Observation,
    Pricing,
    fit,
    kv_bytes,
    predict,
    weights,
)
from mosaic_export.decide.profile import load_profile
from mosaic_export.decide.search import NEIGHBOUR, STEP, search
from mosaic_export.method.plan import PruneSettings
from mosaic_export.method.pod import LayerMeasurement
from mosaic_export.model.arch import LayerDims
from mosaic_export.model.load import load_model
from mosaic_export.model.resize import resize_layer
from mosaic_export.targets.gguf.pricing import intended_types
from mosaic_export.targets.gguf.writer import export
from mosaic_export.targets.onnx.writer import export as export_onnx
from tests.conftest import tiny_model, tiny_tokenizer

# Rows of 256: k-quants fit the dense q/k/v/gate/up/down; o of 2 heads (128) does not.
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=3)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    tiny_model(**WIDE).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(320).save_pretrained(folder)
    return folder


def _resized(folder):
    loaded = load_model(str(folder))
    layers = loaded.spec.layer_list(loaded.model)
    resize_layer(layers[0], loaded.spec, 64, [2, 3], [1], list(range(256)))
    resize_layer(layers[2], loaded.spec, 64, [0, 1, 2, 3], [0, 1], list(range(0, 512, 2)))
    assert loaded.layer_dims == [LayerDims(2, 1, 256), LayerDims(4, 2, 512), LayerDims(4, 2, 256)]
    return loaded


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "F16"])
def test_gguf_weight_bytes_are_exact(wide_dir, tmp_path, quant):
    loaded = _resized(wide_dir)
    predicted = weights(loaded.shape, loaded.layer_dims, Format("gguf", quant),
                        intended_types(loaded, quant))
    export(loaded, tmp_path / "m.gguf", quant)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert predicted.total == sum(int(t.n_bytes) for t in reader.tensors)
    if quant == "Q4_K_M":  # layer 0's o (2 heads x 64 = 128 inputs) fell back; layer 1's did not
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_output.weight"] not in ("Q4_K", "Q5_K", "Q6_K")
        assert types["blk.1.attn_output.weight"] in ("Q4_K", "Q5_K", "Q6_K")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_onnx_weight_bytes_are_exact(wide_dir, tmp_path, dtype):
    loaded = _resized(wide_dir)
    predicted = weights(loaded.shape, loaded.layer_dims, Format("onnx", dtype))
    export_onnx(loaded, tmp_path / "o", dtype)
    graph = onnx.load(tmp_path / "o" / "model.onnx").graph  # initializers, wherever stored
    stored = [numpy_helper.to_array(t) for t in graph.initializer if not t.name.startswith("rotary")]
    assert predicted.total == sum(a.nbytes for a in stored if a.size > 64)  # not the constants


def test_kv_bytes_follow_each_layers_kv_heads(wide_dir):
    loaded = _resized(wide_dir)
    # (1 + 2 + 2) KV heads x 64 x 2 (K and V) x 100 tokens x 2 bytes (llama.cpp F16 cache)
    assert kv_bytes(loaded.shape, loaded.layer_dims, Format("gguf", "Q8_0"), 100) == 5 * 64 * 2 * 100 * 2
    assert kv_bytes(loaded.shape, loaded.layer_dims, Format("onnx", "fp32"), 100) == 5 * 64 * 2 * 100 * 4


def test_fit_recovers_the_terms_it_was_made_from(wide_dir):
    loaded = load_model(str(wide_dir))
    shape, fmt = loaded.shape, Format("onnx", "fp32")
    truth = Calibration(0.002, 20e9, 0.01, 50e9, 150e6, 1.1, "measured")
    obs = []
    for layer in (LayerDims(4, 2, 512), LayerDims(2, 1, 256), LayerDims(2, 1, 128)):
        dims = [layer] * shape.n_layers
        c = predict(shape, dims, fmt, truth, 1024)
        obs.append(Observation(dims, c.decode_tokens_per_s, c.prefill_tokens_per_s, c.memory_bytes, 1024))
    got = fit(shape, fmt, obs)
    for field in ("decode_overhead_s", "bandwidth", "prefill_overhead_s", "prefill_flops",
                  "memory_base", "memory_per_weight_byte"):
        assert getattr(got, field) == pytest.approx(getattr(truth, field), rel=1e-6, abs=1e-9)


def _measurements(shape):
    g = torch.Generator().manual_seed(0)
    return [LayerMeasurement({p: 0.05 for p in ("q", "k", "v", "o", "gate", "up", "down")}, 0.05,
                             {"attn": 0.05, "mlp": 0.05},
                             {"activation": torch.rand(shape.n_head, generator=g)},
                             {"activation": torch.rand(shape.n_ff, generator=g)})
            for _ in range(shape.n_layers)]


def _pricing(shape, bandwidth=1e9):
    # Memory and decode known in closed form: weights at 4 bytes, no overheads.
    calib = Calibration(0.0, bandwidth, 0.0, 1e12, 0.0, 1.0, "measured")
    return Pricing(shape, Format("onnx", "fp32"), calib, 64)


def test_search_finds_the_least_pruning_that_meets_the_budget(wide_dir):
    loaded = load_model(str(wide_dir))
    shape, measured = loaded.shape, _measurements(loaded.shape)
    pricing = _pricing(shape)
    profile = load_profile("laptop-cpu")
    dense = pricing.cost([shape.dense_dims] * shape.n_layers)
    budget = dataclasses.replace(profile.budgets, max_memory_bytes=int(dense.memory_bytes * 0.93),
                                 min_tokens_per_s=None, max_ttft_s=None)
    found = search(shape, "tiny", measured, PruneSettings(sparsity=0.0), budget, pricing)
    chosen = found.chosen
    assert chosen.feasible and chosen.cost.memory_bytes <= budget.max_memory_bytes
    assert 0 < chosen.target <= 0.8
    below = [c for t, c in _all_targets(shape, measured, budget, pricing) if t < chosen.target - 1e-9]
    assert below and not any(c.feasible for c in below)  # nothing with less pruning fits
    assert found.neighbour.target == pytest.approx(max(0.0, chosen.target - NEIGHBOUR))
    assert not found.neighbour.feasible


def _all_targets(shape, measured, budget, pricing):
    from mosaic_export.decide.search import Candidate, cost_checks
    from mosaic_export.method.planner import make_plan

    out = []
    t = STEP
    while t < 0.8:
        s = PruneSettings(sparsity=round(t, 4), structured_fraction=1.0)
        plan = make_plan(shape, "tiny", measured, s)
        cost = pricing.cost([lp.dims for lp in plan.layers])
        checks = cost_checks(budget, cost)
        out.append((t, Candidate(t, plan, cost, checks, all(c.met for c in checks))))
        t += STEP
    return out


def test_search_keeps_the_dense_model_when_it_fits(wide_dir):
    loaded = load_model(str(wide_dir))
    budget = dataclasses.replace(load_profile("laptop-cpu").budgets, max_memory_bytes=10**12,
                                 min_tokens_per_s=1.0, max_ttft_s=None)
    found = search(loaded.shape, "tiny", _measurements(loaded.shape), PruneSettings(sparsity=0.0),
                   budget, _pricing(loaded.shape))
    assert found.chosen.target == 0 and found.neighbour is None


def test_infeasible_budget_names_the_budget_and_the_closest_figure(wide_dir):
    loaded = load_model(str(wide_dir))
    budget = dataclasses.replace(load_profile("laptop-cpu").budgets, max_memory_bytes=1000,
                                 min_tokens_per_s=None, max_ttft_s=None)
    with pytest.raises(UserError, match=r"peak memory budget <= 1000 B cannot be met: the closest "
                                        r"is .* with \d+% of the decoder removed \(a smaller ONNX dtype"):
        search(loaded.shape, "tiny", _measurements(loaded.shape), PruneSettings(sparsity=0.0),
               budget, _pricing(loaded.shape))


def test_budget_overrides_are_checked():
    p = load_profile("laptop-cpu")
    assert p.with_budgets(max_memory="80MiB", min_tokens_per_s=60, context=512).budgets == \
        dataclasses.replace(p.budgets, max_memory_bytes=80 * 2**20, min_tokens_per_s=60, context=512)
    with pytest.raises(UserError, match="expected a size with a unit .* got bare number '80'"):
        p.with_budgets(max_memory="80")
    with pytest.raises(UserError, match="units"):
        p.with_budgets(max_memory="80 tokens")
    with pytest.raises(UserError, match="--min-tokens-per-s: expected a positive value"):
        p.with_budgets(min_tokens_per_s=-1)
    with pytest.raises(UserError, match="contradictory budgets: max memory .* exceeds the device"):
        p.with_budgets(max_memory="64GiB")


def test_nominal_calibration_is_labelled(wide_dir):
    p = load_profile("jetson-orin")
    calib = p.calibration_for(Format("gguf", "Q4_K_M"))
    assert calib.basis == "nominal" and calib.bandwidth == pytest.approx(0.6 * 68e9)


def test_profile_calibration_table_is_checked(tmp_path):
    text = (tmp_path / "p.toml")
    base = """name = "me"\nlocal = true\n[device]\nmemory = "8GiB"\nmemory_bandwidth = "20GB/s"
compute = "100GFLOPS"\nthreads = 2\n[runtime]\ntarget = "gguf"\nquant = "Q8_0"\n[budgets]\ncontext = 512
"""
    text.write_text(base + """[calibration."gguf:Q8_0"]\ndecode_overhead = "1ms"\nbandwidth = "10GB/s"
prefill_overhead = "0s"\nprefill_compute = "50GFLOPS"\nmemory_base = "100MiB"\nmemory_per_weight_byte = 1.0
""")
    p = load_profile(str(text))
    assert p.local and p.calibration_for(Format("gguf", "Q8_0")).bandwidth == 10e9
    assert p.calibration_for(Format("gguf", "Q8_0")).basis == "measured"
    text.write_text(base + """[calibration."gguf:Q8_0"]\nbandwidth = "10GB/s"\n""")
    with pytest.raises(UserError, match="needs exactly the keys"):
        load_profile(str(text))
