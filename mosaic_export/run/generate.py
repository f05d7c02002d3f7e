"""`mosaic-export run OUT --prompt TEXT`: greedy generation with OUT's runtime (the target's
own generate), with the model's chat template when it has one."""

from __future__ import annotations

from pathlib import Path

from mosaic_export import targets
from mosaic_export.bundle.deploy import load_manifest
from mosaic_export.core.errors import UserError


def generate(folder: Path, prompt: str, max_tokens: int = 64, chat: bool = True,
             threads: int | None = None) -> str:
    """Greedy generation with the target runtime (the chat template when the model has one and
    ``chat``); returns the generated text."""
    folder = Path(folder)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    fmt = load_manifest(folder)["format"]
    if fmt["target"] is None:
        raise UserError(f"{folder} holds only the PyTorch checkpoint (built with --target none): "
                        "no runtime file to run")
    path = folder / fmt["model_path"]
    if not path.is_file():
        raise UserError(f"{folder}: the runtime file {fmt['model_path']} is missing")
    return targets.get(fmt["target"]).generate(path, prompt, max_tokens, chat, threads)
