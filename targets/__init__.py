"""Export targets: runtimes a pruned model is written for. Registered explicitly, by name."""

from __future__ import annotations

from ..errors import UserError

TARGETS = ("gguf", "onnx")


def exporter(name: str):
    """The module that writes target ``name`` (check_exportable, export, deploy)."""
    import importlib

    return importlib.import_module(f"{__name__}.{check_target(name)}")


def check_target(name: str) -> str:
    if name not in TARGETS:
        raise UserError(f"target '{name}' is not supported; supported: {', '.join(TARGETS)}")
    return name


def channel_alignment(target: str, type_: str) -> int:
    """The multiple a resized layer's channel counts must keep for the type to store them
    (GGUF: the type's block size; ONNX: none)."""
    if check_target(target) == "gguf":
        from .gguf import alignment

        return alignment(type_)
    return 1
