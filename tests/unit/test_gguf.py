"""GGUF writer on tiny random models: llama.cpp (llama-cpp-python) loads them and matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mosaic_export.cli import main
from mosaic_export.model.load import load_model
from mosaic_export.targets.gguf.runner import _llama, next_token_agreement, quantize
from mosaic_export.targets.gguf.writer import (
    check_types,
    direct,
    export,
    gguf_arch,
    rotary_permute,
    write_gguf,
)
from tests.conftest import heterogeneous_model

IDS = torch.randint(0, 320, (48,), generator=torch.Generator().manual_seed(0))


def _llama_logits(path, ids):
    llm = _llama(path, len(ids), threads=1, logits_all=True)
    llm.eval([int(t) for t in ids])
    return np.asarray(llm.scores[: len(ids)])


def test_rotary_permute_interleaves_halves():
    head_dim, n_head = 8, 2
    w = torch.arange(n_head * head_dim, dtype=torch.float32).unsqueeze(1)  # row index as value
    out = rotary_permute(w, n_head).squeeze(1).tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_f32_matches_pytorch(tiny_model_dir, tmp_path, heterogeneous):
    loaded = heterogeneous_model(tiny_model_dir) if heterogeneous else load_model(str(tiny_model_dir))
    path = tmp_path / "m.gguf"
    check = export(loaded, path, "F32")
    assert gguf_arch(loaded) == ("deci" if heterogeneous else "llama")
    assert set(check.types.values()) == {"F32"} and not check.fallbacks
    with torch.no_grad():
        ref = loaded.model(input_ids=IDS[None]).logits[0].numpy()
    got = _llama_logits(path, IDS)
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_quantized_types_are_checked(tiny_model_dir, tmp_path):
    loaded = heterogeneous_model(tiny_model_dir)
    q8 = export(loaded, tmp_path / "q8.gguf", "Q8_0")  # every row length is a multiple of 32
    weights = {n: t for n, t in q8.types.items() if n.startswith("blk.") and n.endswith(".weight")
               and "norm" not in n}
    assert set(weights.values()) == {"Q8_0"} and not q8.fallbacks
    agreement = next_token_agreement(loaded.model, tmp_path / "q8.gguf", IDS, threads=1)
    assert agreement["top1_agreement"] > 0.8
    # Rows of 64 cannot be k-quant blocks of 256: llama.cpp falls back, and the check says so.
    q4 = export(loaded, tmp_path / "q4.gguf", "Q4_K_M")
    assert q4.fallbacks and all(q4.types[n] not in ("Q4_K", "Q5_K", "Q6_K") for n in q4.fallbacks)
    assert check_types(tmp_path / "q4.gguf", "Q4_K_M").fallbacks == q4.fallbacks


def _contents(path):
    """A GGUF file's metadata (name -> value) and tensors (name -> type, shape, bytes)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: (f.types, [bytes(f.parts[i]) for i in f.data]) for name, f in reader.fields.items()
              if not name.startswith("GGUF.")}
    return fields, {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in reader.tensors}


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_direct_q8_0_is_llama_cpps(tiny_model_dir, tmp_path, heterogeneous, monkeypatch):
    """gguf-py's Q8_0 written directly (no float32 file on disk) is the file llama.cpp's quantizer
    makes from the F32 one: the same metadata and the same bytes of every tensor (llama.cpp orders
    the tensors its own way). Tables and matrices are encoded 50 rows at a time here, as a large
    model's are."""
    from mosaic_export.model import weights

    monkeypatch.setattr(weights, "TABLE_CHUNK", 64 * 4 * 50)
    loaded = heterogeneous_model(tiny_model_dir) if heterogeneous else load_model(str(tiny_model_dir))
    assert direct(loaded, "Q8_0") and not direct(loaded, "Q6_K")
    write_gguf(loaded, tmp_path / "f32.gguf", "F32")
    quantize(tmp_path / "f32.gguf", tmp_path / "cpp.gguf", "Q8_0")
    write_gguf(loaded, tmp_path / "direct.gguf", "Q8_0")
    cpp_fields, cpp = _contents(tmp_path / "cpp.gguf")
    own_fields, own = _contents(tmp_path / "direct.gguf")
    assert own_fields == cpp_fields
    assert sorted(own) == sorted(cpp)
    for name in cpp:
        assert own[name] == cpp[name], name


def test_q8_0_rows_not_in_blocks_go_through_llama_cpp(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    layer = loaded.spec.layer_list(loaded.model)[0]
    down = loaded.spec.projection(layer, "down")
    down.weight = torch.nn.Parameter(down.weight[:, :-8])  # rows of 8 less than whole blocks
    assert not direct(loaded, "Q8_0")


def test_cli_target_gguf_and_bench(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["--model", str(tiny_model_dir), "--sparsity", "0.3", "--structured-fraction", "1",
                 "--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2",
                 "--eval-seq-len", "64", "--target", "gguf", "--quant", "F32", "--threads", "1",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    g = report["gguf"]
    assert (out / "model-F32.gguf").stat().st_size == g["benchmark"]["file_bytes"]
    assert g["parity"]["top1_agreement"] == 1.0
    decode = g["benchmark"]["decode"]  # the default 128 tokens; tokens/s over the median step
    assert decode["tokens"] == 128 and decode["mean_tokens_per_s"] == pytest.approx(128 / decode["seconds"])
    assert g["benchmark"]["perplexity"]["n_windows"] == 2
    assert main(["bench", str(out / "model-F32.gguf"), "--eval-windows", "1", "--gen-tokens", "8",
                 "--prompt-tokens", "32", "--threads", "1"]) == 0


def test_bad_quant_type(tiny_model_dir, tmp_path, capsys):
    code = main(["--model", str(tiny_model_dir), "--target", "gguf", "--quant", "Q3_K",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "GGUF type 'Q3_K' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sentencepiece_merges_rank_by_the_joined_piece_score():
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    from mosaic_export.model.gguf_vocab import merges

    tokens = ["<s>", "a", "b", "c", "ab", "bc", "abc", "ca"]
    scores = [0.0, -1, -2, -3, -4, -5, -6, -7]
    types = [3, 1, 1, 1, 1, 1, 1, 1]  # <s> is a control token: never a merge
    found = merges(tokens, scores, types)
    assert found == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("c", "a")]
    bpe = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, found))
    # llama.cpp merges the best-scoring adjacent pair first: ab, then abc; then c a -> ca
    assert bpe.encode("abcca").tokens == ["abc", "ca"]
