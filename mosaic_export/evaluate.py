"""Perplexity on a text file, the same protocol for the dense and the pruned model.

Protocol: the whole file is tokenized once, without special tokens; it is cut into consecutive
non-overlapping windows of ``seq_len`` tokens from the start (the tail shorter than a window is
dropped) and the first ``max_windows`` are used (all when None). Each window is scored on its own
(no context carried over): the model predicts tokens 2..seq_len of the window, and perplexity is
exp(mean negative log-likelihood) over all predicted tokens of all windows. The same pass counts
next-token top-1 accuracy: how often the most likely token is the one that follows.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int
    seq_len: int
    n_predicted: int
    text: str  # the file it was measured on
    top1: float = float("nan")  # next-token top-1 accuracy over the same predicted tokens

    def to_dict(self) -> dict:
        return asdict(self)


def windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None, source: str) -> torch.Tensor:
    n = tokens.numel() // seq_len
    if n == 0:
        raise UserError(f"evaluation text {source} has {tokens.numel()} tokens, fewer than one "
                        f"window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, text: str, batch_size: int = 1,
               desc: str = "perplexity", logits_chunk: int = 128, streamed=None) -> Perplexity:
    """batches: (n_windows, seq_len) token ids.

    The output layer runs on ``logits_chunk`` positions at a time, so a large vocabulary never
    needs the logits of a whole window in memory (SmolLM2: 512 x 49152 floats = 100 MB).
    ``streamed`` (a model_io.LoadedModel whose layers stay on disk): every window goes through
    one layer at a time (calibration.LayerStream), the same operations in the same order.
    """
    head = model.get_output_embeddings()
    hidden = _streamed_hidden(streamed, batches, batch_size, desc) if streamed is not None else None
    with streamed.weights.tables("output") if streamed is not None else nullcontext():
        return _score(model, head, batches, batch_size, desc, logits_chunk, hidden, text)


def _score(model, head, batches, batch_size, desc, logits_chunk, hidden, text) -> Perplexity:
    total, count, correct = 0.0, 0, 0
    for k, chunk in enumerate(tqdm(batches.split(batch_size), desc=desc, unit="window", leave=False)):
        h = hidden[k] if hidden is not None else model.get_decoder()(input_ids=chunk,
                                                                     use_cache=False).last_hidden_state
        for s in range(0, chunk.shape[1] - 1, logits_chunk):
            e = min(s + logits_chunk, chunk.shape[1] - 1)
            logits = head(h[:, s:e])  # (B, e - s, vocab)
            targets = chunk[:, s + 1:e + 1]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           targets.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
        count += chunk[:, 1:].numel()
    mean = total / count
    return Perplexity(math.exp(mean), mean, batches.shape[0], batches.shape[1], count, text,
                      correct / count)


def _streamed_hidden(loaded, batches: torch.Tensor, batch_size: int, desc: str) -> list[torch.Tensor]:
    """The final norm's output for each batch of windows, the model's layers read one at a time."""
    from .calibration import LayerStream

    stream = LayerStream(loaded.model, loaded.spec, batches, batch_size, loaded.weights)
    for _, layer in stream.layers(f"{desc}, layers"):
        stream.advance(layer)
    norm = loaded.model.get_submodule(loaded.spec.final_norm)
    return [norm(h) for h in stream.hidden]


class StreamedForward:
    """``model(input_ids=ids).logits`` of a streamed model (its layers read one at a time): what a
    runtime's parity check calls on the PyTorch side."""

    def __init__(self, loaded):
        self.loaded = loaded

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        hidden = _streamed_hidden(self.loaded, input_ids, input_ids.shape[0], "forward")[0]
        with self.loaded.weights.tables("output"):
            return SimpleNamespace(logits=self.loaded.model.get_output_embeddings()(hidden))


def forward_model(loaded):
    """What to call for logits: the model itself, or for a streamed one a StreamedForward."""
    return loaded.model if loaded.weights is None else StreamedForward(loaded)
