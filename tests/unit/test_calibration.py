from __future__ import annotations

import json

import pytest
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import corpus, read_text
from mosaic_export.method.calibration import sample_windows


def test_jsonl_and_text(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert read_text(str(f)) == "one\n\ntwo"
    g = tmp_path / "c.txt"
    g.write_text("plain text")
    assert read_text(str(g)) == "plain text"


@pytest.mark.parametrize("line, message", [("{not json", "c.jsonl:1: not valid JSON"),
                                           ('{"txt": "x"}', "c.jsonl:1: expected an object")])
def test_bad_jsonl(tmp_path, line, message):
    f = tmp_path / "c.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        read_text(str(f))


def test_builtin_split_is_disjoint():
    calib, heldout = corpus("builtin"), corpus("builtin-heldout")
    assert len(heldout) > 40_000 and len(calib) > 8 * len(heldout)
    assert calib + heldout == read_text("builtin")


def test_windows_are_seeded():
    tokens = torch.arange(1000)
    a = sample_windows(tokens, 4, 16, seed=0)
    assert a.shape == (4, 16) and torch.equal(a, sample_windows(tokens, 4, 16, seed=0))
    assert not torch.equal(a, sample_windows(tokens, 4, 16, seed=1))
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 16)) for row in a)
    with pytest.raises(UserError, match="fewer than one sample"):
        sample_windows(torch.arange(10), 1, 16, seed=0, source="tiny.txt")


def test_special_token_text_in_plain_text_is_text():
    """WikiText writes "<unk>", a special token of Gemma's vocabulary; llama.cpp and ONNX Runtime
    read plain text as text, so the PyTorch side must too, or perplexities are not comparable."""
    from mosaic_export.method.calibration import tokenize
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer(320)
    eos = tok.convert_tokens_to_ids("<eos>")
    assert eos in tok("a <eos> b", add_special_tokens=False).input_ids  # transformers' default
    ids = tokenize(tok, "a <eos> b").tolist()
    assert eos not in ids and tok.decode(ids) == "a <eos> b"


def test_states_kept_in_a_smaller_dtype(tiny_model_dir):
    """--calib-states bfloat16: the states between layers are bfloat16 (half the bytes), each layer
    still runs in float32; the statistics move a little, not much."""
    from mosaic_export.method.calibration import LayerStream
    from mosaic_export.model.load import load_model

    loaded = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    stats = {}
    for states in ("float32", "bfloat16"):
        stream = LayerStream(loaded.model, loaded.spec, ids, 1, states=states)
        for _, layer in stream.layers("test"):
            stats[states] = stream.statistics(layer, set(), advance=True)
        assert {h.dtype for h in stream.hidden} == {getattr(torch, states)}
    for group, s in stats["float32"].items():
        other = stats["bfloat16"][group].sq_norm
        assert not torch.equal(other, s.sq_norm) and torch.allclose(other, s.sq_norm, rtol=0.05), group
