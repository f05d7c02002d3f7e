"""Perplexity from a runtime's own logits, window by window: shared by the runners (numpy only;
they run in child processes whose memory is measured, so nothing heavier is imported here)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import corpus


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def window_perplexity(logits_of: Callable[[list[int]], np.ndarray], tokens: list[int], seq_len: int,
                      max_windows: int | None) -> dict:
    """Non-overlapping windows of seq_len tokens from the start, each scored alone (the protocol
    of mosaic_export/evaluate.py); ``logits_of(window)`` gives the logits (seq_len - 1, vocab) of
    every position but the last."""
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"evaluation text has fewer than {seq_len} tokens")
    total, correct = 0.0, 0
    for w in range(n):
        window = tokens[w * seq_len:(w + 1) * seq_len]
        logits = np.asarray(logits_of(window))
        targets = np.asarray(window[1:])
        total -= float(log_softmax(logits)[np.arange(seq_len - 1), targets].sum())
        correct += int((logits.argmax(-1) == targets).sum())
    count = n * (seq_len - 1)
    return {"perplexity": math.exp(total / count), "nll": total / count, "top1": correct / count,
            "n_windows": n, "seq_len": seq_len, "n_predicted": count}


def text_ids(tok, source: str) -> list[int]:
    """The token ids of a text (texts.corpus) as plain text: a special token's text in it is text."""

    tok.encode_special_tokens = True
    return tok.encode(corpus(source), add_special_tokens=False).ids
