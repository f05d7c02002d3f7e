"""A GGUF source, converted once.

transformers reads a GGUF file slowly: for SmolLM2-135M about 40 s, most of it parsing the
49,152-token vocabulary again for the config, the tokenizer and the weights, and converting it
to a fast tokenizer. The float32 model and the tokenizer it produces are kept as a Hugging Face
folder and loaded from there the next time (about 0.3 s): the same tensors, config and tokens.

An entry is keyed by the file's SHA-256 and the versions of transformers and gguf that converted
it, so a changed file or library converts again. MOSAIC_EXPORT_CACHE names the folder (default
$XDG_CACHE_HOME/mosaic-export, else ~/.cache/mosaic-export); MOSAIC_EXPORT_CACHE=off turns the
cache off. The cache only saves time: an entry that cannot be written (a read-only or full disk)
is skipped with a warning, and nothing is written when it would leave less than SPARE free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from mosaic_export.core.errors import UserError

ENV = "MOSAIC_EXPORT_CACHE"
FORMAT = 1  # of an entry; raised when what is kept, or how this tool rebuilds a tokenizer, changes
SPARE = 2 * 2**30  # bytes an entry must leave free on the cache's disk
SOURCE = "source.json"  # in an entry: the GGUF file it came from and its architecture


def root() -> Path | None:
    """The cache folder; None when MOSAIC_EXPORT_CACHE=off."""
    given = os.environ.get(ENV)
    if given == "off":
        return None
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mosaic-export"


def entry(gguf_file: Path) -> Path | None:
    """Where gguf_file's conversion is (or would be) kept."""
    folder = root()
    if folder is None:
        return None
    import gguf
    import transformers

    digest = hashlib.sha256()
    try:
        with open(gguf_file, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"{gguf_file}: cannot be read ({e.strerror or e})") from None
    versions = f"v{FORMAT}-transformers{transformers.__version__}-gguf{_version(gguf)}"
    return folder / "gguf" / f"{digest.hexdigest()[:32]}-{versions}"


def _version(module) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return "unknown"


def load(folder: Path, gguf_file: Path):
    """(model, tokenizer, architecture) from an entry; None when there is no entry, or only a
    damaged one (removed, to be written again)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        return None
    try:
        architecture = json.loads((folder / SOURCE).read_text(encoding="utf-8"))["architecture"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # a damaged entry: transformers and safetensors raise many kinds
        shutil.rmtree(folder, ignore_errors=True)
        return None
    model.config._name_or_path = str(gguf_file.parent)  # as a direct load names it
    return model, _named(tokenizer, gguf_file), architecture


def saved_and_loaded(tokenizer, gguf_file: Path):
    """The tokenizer as an entry gives it back. A converted GGUF tokenizer saves its special
    tokens in another form than one loaded from a folder; both tokenize the same, but a run must
    write the same files whether its source was converted now or earlier."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mosaic-export-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return _named(AutoTokenizer.from_pretrained(tmp), gguf_file)


def _named(tokenizer, gguf_file: Path):
    tokenizer.name_or_path = str(gguf_file.parent)
    return tokenizer


def store(folder: Path, gguf_file: Path, model, tokenizer, architecture: str) -> None:
    """Write an entry under a temporary name and move it into place; skip it (with a warning)
    when the disk cannot take it."""
    need = 4 * sum(p.numel() for p in model.parameters()) + SPARE
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder.parent).free < need:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / SOURCE).write_text(json.dumps({"gguf": str(gguf_file), "architecture": architecture})
                                      + "\n", encoding="utf-8")
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # another process stored it first: keep theirs
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        print(f"mosaic-export: warning: cannot cache the converted GGUF in {folder.parent} "
              f"({e.strerror or e}); set {ENV}=off to stop trying", file=sys.stderr)
