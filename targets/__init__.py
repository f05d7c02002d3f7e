"""Export targets: runtimes a pruned model is written for. Registered explicitly, by name."""

from __future__ import annotations

from ..errors import UserError

TARGETS = ("gguf", "onnx")


def check_target(name: str) -> str:
    if name not in TARGETS:
        raise UserError(f"target '{name}' is not supported; supported: {', '.join(TARGETS)}")
    return name
