"""Calibration: sample text, then stream it through the model one decoder layer at a time.

The inputs of layer 0 are captured once; after that each layer is run on the outputs of the
previous one, so the process holds the model once plus one layer's activations and statistics.
While a layer runs, hooks on its projections record per input feature the squared norm
sum_t x_t,k^2 (Wanda, POD), the sum sum_t x_t,k (means and variances) and, where asked, the
Gram matrix H = X^T X (SparseGPT, compensation).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mosaic_export.core.errors import UserError
from mosaic_export.measure.process import release_memory
from mosaic_export.model.arch import ArchSpec
from mosaic_export.model.names import INPUT_GROUPS
from mosaic_export.model.weights import LayerWeights, release

if TYPE_CHECKING:
    pass


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one (n_tokens,) id tensor, without special tokens: added nowhere, and a
    special token's text inside it ("<unk>" in WikiText, for Gemma a special token) read as text,
    as llama.cpp and ONNX Runtime's scorers read it."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    split_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int,
                   source: str = "text") -> torch.Tensor:
    """n_samples random windows of seq_len tokens: (n_samples, seq_len). Same seed, same windows."""
    if tokens.numel() < seq_len + 1:
        raise UserError(f"calibration text {source} has {tokens.numel()} tokens, fewer than one "
                        f"sample of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


@dataclass
class InputStats:
    """Statistics of one projection input (in features) over all calibration tokens."""

    sq_norm: torch.Tensor  # (in,) sum over tokens of x_k^2 (float64)
    hessian: torch.Tensor | None  # (in, in) X^T X (float32 accumulation), when asked for
    n_tokens: int
    total: torch.Tensor | None = None  # (in,) sum over tokens of x_k (float64)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.n_tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of each input feature over the tokens (float64)."""
        n = max(self.n_tokens, 2)
        return ((self.sq_norm - self.total ** 2 / n) / (n - 1)).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:
        """||X_k||_2 (in,), the Wanda input norm."""
        return self.sq_norm.sqrt().float()


class _StopForward(Exception):
    pass


def first_of_kinds(layers) -> list[int]:
    """The index of each kind's first layer, in order. The calibration inputs are caught there, so
    a pass runs the layers before the last of them first (Gemma 3: 5; one kind: none)."""
    first: dict[str | None, int] = {}
    for i, layer in enumerate(layers):
        first.setdefault(_kind(layer), i)
    return list(first.values())


def _same(a, b) -> bool:
    """Equal values: tensors (shape, dtype and every element), containers of them, plain scalars;
    anything else only if the very same object."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str)) and type(a) is type(b):
        return a == b
    return a is b


def _kind(layer: nn.Module) -> str | None:
    return getattr(layer, "attention_type", None)


class LayerStream:
    """Calibration activations flowing through the decoder, one layer at a time."""

    def __init__(self, model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor,
                 batch_size: int = 4, weights: LayerWeights | None = None, states: str = "float32"):
        """``weights``: a streamed model's (model_io.LoadedModel.weights): each layer is read
        before its turn in ``layers`` and let go (or written, see LayerWeights.sink) after it.
        ``states``: the dtype the hidden states are kept in between layers (plan.STATE_DTYPES);
        a layer runs on them in float32."""
        self.model, self.spec, self.weights = model, spec, weights
        self.dtype = getattr(torch, states)
        # per batch (B, T, hidden); a streamed model's on disk, in its run's work folder
        spill = weights.work if weights is not None else None
        self.hidden: list[torch.Tensor] | SpilledStates = SpilledStates(spill) if spill else []
        # per kind of layer (transformers' attention_type: Gemma's sliding and full layers get
        # different masks), per batch: the layer's keyword inputs (mask, position embeddings, ...)
        self.kwargs: dict[str | None, list[dict]] = {}
        layers = spec.layer_list(model)
        firsts = first_of_kinds(layers)
        last = firsts[-1]

        def catch(module, args, kwargs):
            if module is layers[0]:
                self.hidden.append((args[0] if args else kwargs["hidden_states"]).to(self.dtype))
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            runs = self.kwargs.setdefault(_kind(module), [])
            # batches of the same length get the same mask and positions: held once
            runs.append(runs[-1] if runs and _same(runs[-1], extra) else extra)
            if module is layers[last]:
                raise _StopForward

        handles = [layers[i].register_forward_pre_hook(catch, with_kwargs=True) for i in firsts]
        # run through to the first layer of the last kind: a streamed model's layers before it
        # read, and of its embedding only the rows of these ids
        held = weights.held(list(enumerate(layers))[:last]) if weights is not None else nullcontext()
        rows = weights.embedding_rows(input_ids) if weights is not None else nullcontext(input_ids)
        try:
            with torch.no_grad(), held, rows as ids:
                for batch in ids.split(batch_size):
                    try:
                        model(input_ids=batch, use_cache=False)
                    except _StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()

    def layers(self, desc: str) -> Iterator[tuple[int, nn.Module]]:
        layers = self.spec.layer_list(self.model)
        for i, layer in tqdm(list(enumerate(layers)), desc=desc, unit="layer", leave=False):
            if self.weights is not None:
                self.weights.open(i, layer)
            try:
                yield i, layer
            except GeneratorExit:  # the consumer stopped early: the layer let go, not written
                if self.weights is not None:
                    release(layer)
                raise
            if self.weights is not None:
                self.weights.close(i, layer)
            release_memory()

    @torch.no_grad()
    def run(self, layer: nn.Module, advance: bool = False) -> None:
        """Run the layer on the current inputs (for its hooks); with ``advance`` its outputs
        replace them (the next layer's inputs), a batch at a time, so that both are never held
        whole; else each batch's output is dropped as soon as it is made."""
        for k, (h, kw) in enumerate(zip(self.hidden, self.kwargs[_kind(layer)], strict=True)):
            out = layer(h.float(), **kw)
            if advance:
                self.hidden[k] = (out[0] if isinstance(out, tuple) else out).to(self.dtype)

    def advance(self, layer: nn.Module) -> None:
        """Replace the inputs by this layer's outputs: the next layer's inputs."""
        self.run(layer, advance=True)

    @torch.no_grad()
    def statistics(self, layer: nn.Module, hessian_groups: set[str],
                   advance: bool = False) -> dict[str, InputStats]:
        """Run the layer once, recording InputStats for each input group (arch.INPUT_GROUPS).

        With ``advance`` the layer is final: its outputs become the next layer's inputs.
        """
        stats: dict[str, InputStats] = {}
        handles = []
        present = self.spec.present(layer)
        for group, members in INPUT_GROUPS.items():
            if members[0] not in present:  # a removed block (blocks.py)
                continue
            module = self.spec.projection(layer, members[0])

            def hook(_m, args, _out, group=group):
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                s = stats.get(group)
                if s is None:
                    n = x.shape[1]
                    h = torch.zeros(n, n) if group in hessian_groups else None
                    s = stats[group] = InputStats(torch.zeros(n, dtype=torch.float64), h, 0,
                                                  torch.zeros(n, dtype=torch.float64))
                s.sq_norm += (x * x).sum(0, dtype=torch.float64)
                s.total += x.sum(0, dtype=torch.float64)
                if s.hessian is not None:
                    s.hessian.addmm_(x.T, x)
                s.n_tokens += x.shape[0]

            handles.append(module.register_forward_hook(hook))
        try:
            self.run(layer, advance)
        finally:
            for h in handles:
                h.remove()
        return stats


class SpilledStates:
    """Hidden states kept on disk, a batch to a file, read when an item is used and written when
    one is set or appended: a list in which only the batch at work is in memory. The files go
    with the object."""

    def __init__(self, folder: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="states-", dir=folder))
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[torch.dtype] = []
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k: int) -> torch.Tensor:
        data = torch.from_numpy(np.fromfile(self.folder / f"{k}.bin", dtype=np.uint8))
        return data.view(self.dtypes[k]).view(self.shapes[k])

    def __setitem__(self, k: int, value: torch.Tensor) -> None:
        """Its bytes as they are (any dtype: bfloat16 too, which numpy has not)."""
        value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tofile(self.folder / f"{k}.bin")
        self.shapes[k], self.dtypes[k] = tuple(value.shape), value.dtype

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[k] for k in range(len(self)))

    def append(self, value: torch.Tensor) -> None:
        self.shapes.append(tuple(value.shape))
        self.dtypes.append(value.dtype)
        self[len(self.shapes) - 1] = value
