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
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mosaic_export.core.errors import UserError
from mosaic_export.method.calibration import LayerStream
from mosaic_export.model.weights import table_chunks

if TYPE_CHECKING:
    from mosaic_export.method.calibration import SpilledStates


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

    The output layer runs on ``logits_chunk`` positions and one chunk of its table's rows at a
    time (weights.table_chunks), the log-sum-exp over the vocabulary carried from chunk to chunk:
    neither a window's logits (SmolLM2: 512 x 49152 floats, 100 MB) nor, for a streamed model, the
    table is ever whole in memory. ``streamed`` (a model_io.LoadedModel whose layers stay on
    disk): the windows go through one layer at a time (calibration.LayerStream), then the table
    is read a chunk at a time; each position sees the same operations in the same order either
    way, so the figures are the same.
    """

    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError("scoring perplexity does not handle an output layer with a bias")
    if batches.numel() and not 0 <= int(batches.min()) <= int(batches.max()) < head.weight.shape[0]:
        raise UserError(f"token ids outside the output layer's {head.weight.shape[0]} rows")
    score = _Score(batches.split(batch_size), logits_chunk)
    if streamed is None:
        decoder = model.get_decoder()
        for k, chunk in enumerate(tqdm(score.batches, desc=desc, unit="window", leave=False)):
            h = decoder(input_ids=chunk, use_cache=False).last_hidden_state
            for first, rows in table_chunks(model, None, "output"):
                score.add(k, h, first, rows)
    else:
        hidden = _streamed_hidden(streamed, batches, batch_size, desc)
        chunks = table_chunks(model, streamed.weights, "output")
        for first, rows in tqdm(chunks, desc=f"{desc}, output table", unit="chunk", leave=False):
            for k, h in enumerate(hidden):
                score.add(k, h, first, rows)
    return score.result(batches.shape, text)


class _Score:
    """Per predicted position of each batch of windows: the running maximum logit and sum of
    exponentials over the table's chunks seen so far, the logit of the token that follows, and
    the most likely token."""

    def __init__(self, batches: tuple[torch.Tensor, ...], logits_chunk: int):
        self.batches, self.step = batches, logits_chunk
        shapes = [(b.shape[0], b.shape[1] - 1) for b in batches]
        self.top = [torch.full(s, -math.inf) for s in shapes]
        self.sum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.target = [torch.zeros(s) for s in shapes]
        self.best = [torch.zeros(s, dtype=torch.long) for s in shapes]

    def add(self, k: int, h: torch.Tensor, first: int, rows: torch.Tensor) -> None:
        """Batch k's hidden states h (B, T, hidden) scored against table rows first.. ."""
        targets, n = self.batches[k][:, 1:], rows.shape[0]
        for s in range(0, targets.shape[1], self.step):
            e = min(s + self.step, targets.shape[1])
            logits = F.linear(h[:, s:e], rows)  # (B, e - s, n)
            top, arg = logits.max(-1)
            old = self.top[k][:, s:e]
            new = torch.maximum(old, top)
            self.sum[k][:, s:e] = (self.sum[k][:, s:e] * torch.exp((old - new).double())
                                   + torch.exp(logits - new.unsqueeze(-1)).sum(-1, dtype=torch.float64))
            self.best[k][:, s:e] = torch.where(top > old, arg + first, self.best[k][:, s:e])
            self.top[k][:, s:e] = new
            t = targets[:, s:e]
            inside = (t >= first) & (t < first + n)
            picked = logits.gather(-1, (t - first).clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)
            self.target[k][:, s:e] = torch.where(inside, picked, self.target[k][:, s:e])

    def result(self, shape: torch.Size, text: str) -> Perplexity:
        total, count, correct = 0.0, 0, 0
        for k, batch in enumerate(self.batches):
            nll = self.top[k].double() + self.sum[k].log() - self.target[k].double()
            total += float(nll.sum())
            count += nll.numel()
            correct += int((self.best[k] == batch[:, 1:]).sum())
        mean = total / count
        return Perplexity(math.exp(mean), mean, shape[0], shape[1], count, text, correct / count)


def _streamed_hidden(loaded, batches: torch.Tensor, batch_size: int,
                     desc: str) -> list[torch.Tensor] | SpilledStates:
    """The final norm's output for each batch of windows, the model's layers read one at a time."""

    stream = LayerStream(loaded.model, loaded.spec, batches, batch_size, loaded.weights)
    for _, layer in stream.layers(f"{desc}, layers"):
        stream.advance(layer)
    norm = loaded.model.get_submodule(loaded.spec.final_norm)
    for k, h in enumerate(stream.hidden):  # in place: the states are never held twice
        stream.hidden[k] = norm(h)
    return stream.hidden


class StreamedForward:
    """``model(input_ids=ids).logits`` of a streamed model (its layers read one at a time): what a
    runtime's parity check calls on the PyTorch side."""

    def __init__(self, loaded):
        self.loaded = loaded

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        hidden = _streamed_hidden(self.loaded, input_ids, input_ids.shape[0], "forward")[0]
        model = self.loaded.model
        logits = torch.empty(*hidden.shape[:-1], model.get_output_embeddings().weight.shape[0])
        for first, rows in table_chunks(model, self.loaded.weights, "output"):  # the table never whole
            logits[..., first:first + rows.shape[0]] = F.linear(hidden, rows)
        return SimpleNamespace(logits=logits)


def forward_model(loaded):
    """What to call for logits: the model itself, or for a streamed one a StreamedForward."""
    return loaded.model if loaded.weights is None else StreamedForward(loaded)
