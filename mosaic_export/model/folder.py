"""A model folder on disk: its config, its safetensors files, its tokenizer files, its generation
config, and the record of a loaded model (LoadedModel). Loading (load.py) and the resized
checkpoint (checkpoint.py) both read folders through here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mosaic_export.core.errors import UserError
from mosaic_export.model.arch import ArchSpec, LayerDims, ModelShape
from mosaic_export.model.weights import LayerWeights

CHECKPOINT_KEY = "mosaic_export"
CHECKPOINT_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: ArchSpec
    shape: ModelShape  # the dense sizes
    source: str  # what the user named (or the default's path)
    gguf_file: Path | None  # the GGUF the weights came from, if any
    # streamed (load_model(stream=True)): the decoder layers' weights stay on disk, read one layer
    # at a time by calibration passes; None when the whole model is in memory
    weights: LayerWeights | None = None

    @property
    def layer_dims(self) -> list[LayerDims]:
        """The current sizes of each layer, read from the modules (resize.py changes them)."""
        return [self.spec.layer_dims(layer, self.shape.head_dim)
                for layer in self.spec.layer_list(self.model)]


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}/config.json: cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder}/config.json: expected a JSON object, got {type(config).__name__}")
    return config


def read_generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's generation_config.json (end-of-sequence ids beyond config.json's), as
    from_pretrained reads it; a model built from its config alone would miss them."""
    if (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)


def is_resized_checkpoint(path: Path) -> bool:
    """Whether path is a resized checkpoint written by this tool (its config records the sizes)."""
    config = Path(path) / "config.json"
    return config.is_file() and CHECKPOINT_KEY in read_config(Path(path))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files named by model.safetensors.index.json, else model.safetensors; each
    checked to open (a truncated or foreign file is refused). Nothing else is ever loaded."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = [folder / str(name) for name in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise UserError(f"no weights (model.safetensors or model.safetensors.index.json) in {folder}; "
                        "only safetensors weights are loaded")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: missing (named by {index.name})")
        try:
            with safe_open(f, framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header or size
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
    return files


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:-1])} or "
                        f"{TOKENIZER_FILES[-1]})")
