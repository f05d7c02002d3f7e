"""Bigger than memory (issue 15): the synthetic checkpoint tool and weights read one tensor at a
time (mosaic_export/weights.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaic_export.model_io import load_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
         "--vocab", "320", "--shard-size", "40KiB"]


def _make(out: Path, tokenizer: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--out", str(out),
                           "--tokenizer", str(tokenizer), *SMALL, *more],
                          capture_output=True, text=True, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_make_synthetic_writes_a_loadable_deterministic_checkpoint(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        done = _make(out, tiny_model_dir)
        assert done.returncode == 0, done.stderr
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 40 KiB
    assert _digest(a) == _digest(b) and len(_digest(a)) == len(set(index["weight_map"].values()))
    loaded = load_model(str(a))
    assert (loaded.shape.n_layers, loaded.shape.hidden, loaded.shape.n_head, loaded.shape.n_kv,
            loaded.shape.n_ff) == (2, 64, 4, 2, 96)
    q = loaded.spec.projection(loaded.spec.layer_list(loaded.model)[0], "q").weight
    assert q.std().item() == pytest.approx(0.02, rel=0.1)  # bf16-rounded normal weights
    assert torch.equal(q, q.bfloat16().float())  # stored in bf16
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    other = _make(tmp_path / "c", tiny_model_dir, "--seed", "1")
    assert other.returncode == 0 and _digest(tmp_path / "c") != _digest(a)


def test_make_synthetic_refuses_bad_requests(tiny_model_dir, tmp_path):
    (tmp_path / "there").mkdir()
    done = _make(tmp_path / "there", tiny_model_dir)
    assert done.returncode == 2 and "exists" in done.stderr
    done = _make(tmp_path / "small", tiny_model_dir, "--vocab", "100")
    assert done.returncode == 2 and "320 tokens, more than --vocab 100" in done.stderr
    assert not any(p.name.startswith(".small") for p in tmp_path.iterdir())  # nothing half-written
