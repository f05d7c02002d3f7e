"""ONNX writer on tiny random models: ONNX Runtime matches PyTorch, with and without the KV cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mosaic_export.cli import main
from mosaic_export.model.load import load_model
from mosaic_export.targets.onnx.runner import OnnxDecoder
from mosaic_export.targets.onnx.table import DTYPES
from mosaic_export.targets.onnx.writer import CONFIG_FILE, export
from tests.conftest import heterogeneous_model

IDS = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The heterogeneous tiny model exported at every precision."""
    loaded = heterogeneous_model(tiny_model_dir)
    root = tmp_path_factory.mktemp("onnx")
    return loaded, {dtype: export(loaded, root / dtype, dtype).parent for dtype in DTYPES}


def _reference(loaded, ids, **kw):
    with torch.no_grad():
        return loaded.model(input_ids=ids, **kw).logits.numpy()


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_fp32_matches_pytorch(tiny_model_dir, tmp_path, heterogeneous):
    loaded = heterogeneous_model(tiny_model_dir) if heterogeneous else load_model(str(tiny_model_dir))
    decoder = OnnxDecoder(export(loaded, tmp_path / "m", "fp32").parent, threads=1)
    logits, present = decoder.forward(IDS.numpy(), decoder.empty_past())
    assert np.abs(logits - _reference(loaded, IDS)).max() < 1e-4
    # present keys / values carry each layer's own KV heads
    assert [present[2 * i].shape[1] for i in range(3)] == [d.n_kv for d in loaded.layer_dims]
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert [layer["n_head"] for layer in config["layers"]] == [d.n_head for d in loaded.layer_dims]
    export(loaded, tmp_path / "again", "fp32")
    for name in ("model.onnx", "model.onnx.data"):  # deterministic
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "m" / name).read_bytes()


def test_cache_gives_the_same_logits_as_one_pass(exported):
    _, folders = exported
    for dtype, folder in folders.items():
        decoder = OnnxDecoder(folder, threads=1)
        whole, _ = decoder.forward(IDS.numpy(), decoder.empty_past())
        first, past = decoder.forward(IDS[:, :30].numpy(), decoder.empty_past())
        second, past = decoder.forward(IDS[:, 30:40].numpy(), past)
        third, past = decoder.forward(IDS[:, 40:].numpy(), past)
        assert past[0].shape[2] == 48
        tolerance = 1e-5 if dtype not in ("int8", "int4") else 0.05  # int8 compute: activations per call
        assert np.abs(np.concatenate([first, second, third], 1) - whole).max() < tolerance, dtype


def test_greedy_generation_matches_transformers(exported):
    loaded, folders = exported
    prompt = IDS[:, :10]
    theirs = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                   min_new_tokens=24, do_sample=False, pad_token_id=0)[0, 10:].tolist()
    assert OnnxDecoder(folders["fp32"]).generate(prompt[0].tolist(), 24) == theirs


def test_right_padding_matches_transformers(exported):
    """A batch of two, the second padded on the right (as GenAI feeds a batch): each row's real
    positions give PyTorch's logits for that row alone."""
    loaded, folders = exported
    ids = torch.stack([IDS[0, :20], torch.cat([IDS[0, 5:20], torch.zeros(5, dtype=torch.long)])])
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    decoder = OnnxDecoder(folders["fp32"], threads=1)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    past = decoder.empty_past(batch=2)
    for i in range(decoder.n_layers):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    logits = decoder.session.run(["logits"], feed)[0]
    assert np.abs(logits[0] - _reference(loaded, ids[:1])[0]).max() < 1e-4
    assert np.abs(logits[1, :15] - _reference(loaded, ids[1:, :15])[0]).max() < 1e-4


def test_reduced_precisions_stay_close(exported):
    loaded, folders = exported
    ref = _reference(loaded, IDS)
    sizes = {}
    for dtype, error in (("fp16", 0.01), ("int8", 0.05), ("int4", 0.25)):  # of the largest logit
        decoder = OnnxDecoder(folders[dtype], threads=1)
        logits, past = decoder.forward(IDS.numpy(), decoder.empty_past())
        assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, dtype
        assert np.abs(logits - ref).max() < error * np.abs(ref).max(), dtype
        sizes[dtype] = _weight_bytes(folders[dtype])
    assert past[0].dtype == np.float32  # int4 is weight quantization; the cache stays float
    assert OnnxDecoder(folders["fp16"]).empty_past()[0].dtype == np.float16
    fp32 = _weight_bytes(folders["fp32"])
    assert sizes["fp16"] < 0.6 * fp32 and sizes["int8"] < 0.6 * fp32 and sizes["int4"] < 0.85 * sizes["int8"]


def _weight_bytes(folder) -> int:
    """Bytes of the initializers but the rotary tables (which dominate a tiny model's file)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx")).graph
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer
               if not t.name.startswith("rotary"))


def test_every_dtype_is_written_with_the_fused_operators(exported):
    """Attention is GroupQueryAttention at each layer's own head counts, norms are fused, and the
    int types are MatMulNBits at their bits with blocks of 32; no plain-operator attention left."""
    import onnx

    loaded, folders = exported
    for dtype, folder in folders.items():
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        ops = [n.op_type for n in graph.node]
        gqa = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
               for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert [(a["num_heads"], a["kv_num_heads"]) for a in gqa] == [(d.n_head, d.n_kv)
                                                                     for d in loaded.layer_dims], dtype
        assert ops.count("SkipSimplifiedLayerNormalization") == 2 * len(loaded.layer_dims), dtype
        assert "Softmax" not in ops and "Expand" not in ops, dtype  # no plain-operator attention
        nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                 for n in graph.node if n.op_type == "MatMulNBits"]
        if dtype in ("int8", "int4"):  # qkv, o, gate, up, down per layer; the output layer at 8 bits
            assert "MatMul" not in ops and len(nbits) == 5 * len(loaded.layer_dims) + 1, dtype
            assert [(a["bits"], a["block_size"], a["accuracy_level"]) for a in nbits] == [
                (int(dtype[3:]), 32, 4)] * (len(nbits) - 1) + [(8, 32, 4)]
            # the tied embedding table is the output layer's int8 matrix, read by GatherBlockQuantized
            assert ops.count("GatherBlockQuantized") == 1, dtype
            assert "embed_tokens.weight" not in {t.name for t in graph.initializer}
        else:
            assert not nbits and "GatherBlockQuantized" not in ops, dtype


def test_an_untied_embedding_is_quantized_on_its_own(tmp_path):
    """Untied: the table gets its own int8 blocks; the model still matches PyTorch closely, and the
    cost model's bytes are the file's."""
    import onnx

    from mosaic_export.decide.costmodel import Format, weights
    from mosaic_export.targets.onnx.quant import block_quantize
    from tests.conftest import TINY, tiny_model, tiny_tokenizer

    tiny_model(tie_word_embeddings=False).save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert not loaded.shape.tied_embeddings
    folder = export(loaded, tmp_path / "int4", "int4").parent
    graph = onnx.load(str(folder / "model.onnx")).graph
    names = {t.name for t in graph.initializer}
    assert {"embed_tokens.codes", "embed_tokens.scales"} <= names and "embed_tokens.weight" not in names
    stored = [onnx.numpy_helper.to_array(t) for t in graph.initializer
              if not t.name.startswith(("rotary", "const_"))]  # not the tables and constants
    predicted = weights(loaded.shape, loaded.layer_dims, Format("onnx", "int4"))
    assert predicted.total == sum(a.nbytes for a in stored)
    folder = export(loaded, tmp_path / "int8", "int8").parent  # int8 everywhere: close to PyTorch
    logits, _ = OnnxDecoder(folder, threads=1).forward(IDS.numpy(), OnnxDecoder(folder).empty_past())
    ref = _reference(loaded, IDS)
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    # the blocks: symmetric, zero point 128, within half a step of the weights
    table = loaded.model.get_input_embeddings().weight.detach().numpy()
    codes, scales = block_quantize(table, 8)
    back = (codes.astype(np.float32) - 128).reshape(len(table), -1, 32) * scales[..., None]
    assert np.abs(back.reshape(len(table), -1) - table).max() <= scales.max() / 2 + 1e-7


def test_int_weights_are_onnxruntimes_own(tiny_model_dir, monkeypatch):
    """The int4 projections are the blocks onnxruntime's MatMulNBitsQuantizer makes of the fp32
    graph, byte for byte; the output layer's int8 matrix, made a chunk of vocabulary rows at a time,
    is the whole table's."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from mosaic_export.model import weights
    from mosaic_export.targets.onnx.graph import build_model
    from mosaic_export.targets.onnx.quant import nbits

    monkeypatch.setattr(weights, "TABLE_CHUNK", 64 * 4 * 50)  # the table in 50-row chunks
    loaded = heterogeneous_model(tiny_model_dir)
    quantizer = MatMulNBitsQuantizer(build_model(loaded, "fp32"), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    ours = {t.name: numpy_helper.to_array(t) for t in build_model(loaded, "int4").graph.initializer}
    projections = [name for name in theirs if name.endswith("_Q4")]
    assert len(projections) == 5 * len(loaded.layer_dims)
    for name in projections:
        scales = name.removesuffix("_Q4") + "_scales"
        assert np.array_equal(ours[name], theirs[name]) and np.array_equal(ours[scales], theirs[scales]), name
    table = loaded.model.get_input_embeddings().weight.detach().numpy()
    packed, scales = nbits(np.ascontiguousarray(table.T), 8)
    assert np.array_equal(ours["lm_head.weight_t_Q8"], packed)
    assert np.array_equal(ours["lm_head.weight_t_scales"], scales)


def test_cli_target_onnx_and_bench(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--sparsity", "0.3", "--structured-fraction", "1",
                 "--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2",
                 "--eval-seq-len", "64", "--target", "onnx", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    o = report["onnx"]
    assert o["dtype"] == "fp32" and (out / "onnx-fp32" / "model.onnx").is_file()
    assert o["parity"]["max_abs_logit_diff"] < 1e-3 and o["parity"]["greedy_identical"]
    decode = o["benchmark"]["decode"]  # the default 128 tokens; tokens/s over the median step
    assert decode["tokens"] == 128 and decode["mean_tokens_per_s"] == pytest.approx(128 / decode["seconds"])
    assert o["benchmark"]["perplexity"]["n_predicted"] == 2 * 63
    assert main(["bench", str(out / "onnx-fp32" / "model.onnx"), "--eval-windows", "0",
                 "--prompt-tokens", "16", "--gen-tokens", "4", "--json", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())["model"]
    assert bench["first_run"]["prefill"]["tokens"] == 16 and bench["rounds"] == len(bench["runs"]) >= 1


@pytest.mark.parametrize("args, message", [
    (["--target", "onnx", "--dtype", "int2"], "ONNX dtype 'int2' is not supported"),
    (["--target", "onnx", "--quant", "Q8_0"], "--quant is for the gguf target"),
    (["--target", "gguf", "--dtype", "fp16"], "--dtype is for the onnx target"),
])
def test_bad_onnx_options(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_bench_rejects_other_paths(tmp_path, capsys):
    (tmp_path / "x.bin").write_text("")
    assert main(["bench", str(tmp_path / "x.bin")]) == 2
    assert "expected a .gguf file or an ONNX folder" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["onnx", "gguf"])
def test_unexportable_model_fails_before_pruning(tmp_path, capsys, target):
    from tests.conftest import TINY, tiny_model, tiny_tokenizer

    folder = tmp_path / "scaled"
    tiny_model(rope_scaling={"rope_type": "linear", "factor": 2.0}).save_pretrained(folder)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--target", target, "--calib-seq-len", "64", "--eval-seq-len",
                 "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rope scaling" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))


def test_weights_are_external_data(exported):
    _, folders = exported
    for folder in folders.values():
        assert (folder / "model.onnx.data").stat().st_size > 4 * (folder / "model.onnx").stat().st_size


def test_external_data_is_written_as_made(tmp_path):
    """Tensors go to the data file as they are made, tables a chunk of rows at a time (transposed:
    each chunk a band of columns); small ones stay in the graph. onnx reads them back as made."""
    import onnx

    from mosaic_export.model.weights import Rows
    from mosaic_export.targets.onnx.data import INLINE_BELOW, ExternalData

    table = torch.randn(37, 11, generator=torch.Generator().manual_seed(0))
    rows = Rows(tuple(table.shape), lambda: iter(table.split(5)))  # uneven chunks, as a vocabulary's
    data = ExternalData(tmp_path / "m.onnx.data")
    big, small = np.arange(300, dtype=np.float32).reshape(20, 15), np.arange(3, dtype=np.int64)
    tensors = [data.array("big", big), data.rows("table_t", rows, np.float16, transpose=True),
               data.array("small", small), data.rows("table", rows, np.float32), data.array("big2", big.T)]
    data.close()
    assert small.nbytes < INLINE_BELOW and not tensors[2].external_data
    graph = onnx.helper.make_graph([], "g", [], [], tensors)
    onnx.save_model(onnx.helper.make_model(graph), str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    back = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = {"big": big, "table_t": table.numpy().T.astype(np.float16), "small": small,
                "table": table.numpy(), "big2": big.T}
    for name, value in expected.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    written = sum(v.nbytes for k, v in expected.items() if k != "small")
    assert (tmp_path / "m.onnx.data").stat().st_size == written


def test_failed_parity_leaves_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from mosaic_export.targets.onnx import writer as onnx_target

    monkeypatch.setattr(onnx_target, "MAX_FP32_LOGIT_DIFF", -1.0)  # no export can pass
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--sparsity", "0.2", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--eval-windows", "0", "--target", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the fp32 ONNX model disagrees with PyTorch" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_read_per_token_are_the_cost_models(exported, dtype):
    """What tools/bench_speed.py takes as the ideal: every matrix multiplied per token (a tied
    output layer's table included, at every dtype), the same as the cost model's, norms apart."""
    from mosaic_export.decide.costmodel import Format, weights
    from mosaic_export.targets import get

    loaded, folders = exported
    predicted = weights(loaded.shape, loaded.layer_dims, Format("onnx", dtype)).per_token
    norms = (2 * len(loaded.layer_dims) + 1) * loaded.shape.hidden * (2 if dtype == "fp16" else 4)
    measured = get("onnx").bytes_per_token(folders[dtype])
    assert norms <= measured - predicted <= norms + 64  # + a few integer constants (shapes)
