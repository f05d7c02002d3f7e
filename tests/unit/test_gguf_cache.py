"""A GGUF source converted once (gguf_cache.py): a later load reads the converted folder and
gives the same model, tokenizer and written files as the first."""

from __future__ import annotations

import pytest
import torch

from mosaic_export.model import gguf_cache
from mosaic_export.model import load as model_io
from mosaic_export.model.checkpoint import save_checkpoint
from mosaic_export.model.load import load_model
from tests.conftest import TINY, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The tiny model as an F32 GGUF file that transformers can read (it wants a BOS token)."""
    from mosaic_export.targets.gguf.writer import export

    folder = tmp_path_factory.mktemp("tiny-gguf")
    tiny_model().save_pretrained(folder / "hf")
    tokenizer = tiny_tokenizer(TINY["vocab_size"])
    tokenizer.bos_token = "<eos>"
    tokenizer.save_pretrained(folder / "hf")
    export(load_model(str(folder / "hf")), folder / "tiny.gguf", "F32")
    return folder / "tiny.gguf"


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_second_load_comes_from_the_cache_and_is_the_same(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    first = load_model(str(tiny_gguf))
    entry = gguf_cache.entry(tiny_gguf)
    assert entry.is_dir() and entry.parent.parent == tmp_path / "cache"

    def converted(_):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_io, "_convert_gguf", converted)
    again = load_model(str(tiny_gguf))
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.model.config.to_dict() == again.model.config.to_dict()
    assert first.spec == again.spec and first.shape == again.shape
    text = "def f(x):\n    return x + 1  <eos> the end"
    assert first.tokenizer(text)["input_ids"] == again.tokenizer(text)["input_ids"]
    save_checkpoint(first, tmp_path / "a")
    save_checkpoint(again, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_with_the_cache_off_a_load_writes_the_same_files(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, "off")
    save_checkpoint(load_model(str(tiny_gguf)), tmp_path / "off")
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    load_model(str(tiny_gguf))
    save_checkpoint(load_model(str(tiny_gguf)), tmp_path / "cached")  # the second: from the cache
    assert _files(tmp_path / "off") == _files(tmp_path / "cached")


def test_a_damaged_entry_is_converted_again(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    load_model(str(tiny_gguf))
    entry = gguf_cache.entry(tiny_gguf)
    (entry / "model.safetensors").write_bytes(b"truncated")
    assert load_model(str(tiny_gguf)).shape.n_layers == TINY["num_hidden_layers"]
    assert (entry / "model.safetensors").stat().st_size > 1000  # written again


def test_another_file_is_another_entry_and_off_writes_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(tiny_gguf.read_bytes() + b"\0" * 32)  # padding after the tensor data
    assert gguf_cache.entry(changed) != gguf_cache.entry(tiny_gguf)
    monkeypatch.setenv(gguf_cache.ENV, "off")
    assert gguf_cache.entry(tiny_gguf) is None
    load_model(str(tiny_gguf))
    assert not (tmp_path / "cache").exists()


def test_a_cache_that_cannot_be_written_warns_and_loads(tiny_gguf, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(gguf_cache.ENV, str(blocked))
    loaded = load_model(str(tiny_gguf))
    assert loaded.shape.n_layers == TINY["num_hidden_layers"]
    assert "cannot cache the converted GGUF" in capsys.readouterr().err
