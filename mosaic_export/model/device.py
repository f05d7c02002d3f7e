"""The torch device a run computes on (recovery, self text): checked at the door."""

from __future__ import annotations

import torch

from mosaic_export.core.errors import UserError


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None): CUDA when torch sees a GPU, else the CPU; otherwise the device named,
    which must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: unknown device {device!r} (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: recovery runs on cpu or cuda")
    return dev
