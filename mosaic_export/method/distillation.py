"""The math of distillation, without a model: the KD loss, the learning-rate schedule, which
weights train and which zeros (unstructured pruning) stay zero. recover.py trains with them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softened next-token distributions, mean per token.
    Logits: (..., vocab)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over the first
    ``warmup`` share of the steps, then cosine decay to zero at the end."""
    n_warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    if step < n_warm:
        return lr * (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def zero_masks(parameters: list[nn.Parameter]) -> dict[int, torch.Tensor]:
    """For each 2-D trainable weight holding exact zeros (unstructured pruning), where it is
    non-zero; keyed by id(parameter). Weights without zeros need no mask."""
    masks = {}
    for p in parameters:
        if p.ndim == 2:
            keep = p.detach() != 0
            if not bool(keep.all()):
                masks[id(p)] = keep
    return masks


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the input embedding (and the output layer when it is tied to it)."""
    frozen = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None and out.weight is model.get_input_embeddings().weight:
        frozen.add(id(out.weight))
    return [p for p in model.parameters() if id(p) not in frozen]
