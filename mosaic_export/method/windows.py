"""Token windows from a text source: random windows (seeded) of a text, or (``self``) text the
model writes itself (self_text.py). Calibration and recovery take their windows here."""

from __future__ import annotations

from pathlib import Path

import torch

from mosaic_export.core.texts import SELF, corpus
from mosaic_export.method.calibration import sample_windows, tokenize
from mosaic_export.method.plan import PruneSettings
from mosaic_export.method.self_text import self_text
from mosaic_export.model.folder import LoadedModel


def source_windows(loaded: LoadedModel, source: str, n: int, seq_len: int, seed: int,
                   cache_dir: Path | None = None, log=print, device: str | None = "cpu") -> torch.Tensor:
    """(n, seq_len) token ids from one text source: random windows (seeded) of a text, or
    (``self``) text the model generates itself (cached in ``cache_dir``)."""
    if source == SELF:
        return self_text(loaded, n * seq_len, seed, cache_dir, log, device).view(n, seq_len)
    return sample_windows(tokenize(loaded.tokenizer, corpus(source)), n, seq_len, seed, source=source)


def calibration_ids(loaded: LoadedModel, settings: PruneSettings, cache_dir: Path | None = None,
                    device: str | None = "cpu") -> torch.Tensor:
    """The calibration windows: sampled from the text source, or (``self``) the model's own text,
    generated before any pruning (cached in ``cache_dir``)."""
    c = settings.calibration
    return source_windows(loaded, c.source, c.n_samples, c.seq_len, c.seed, cache_dir, device=device)
