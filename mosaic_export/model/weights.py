"""Weights read one tensor at a time, for models bigger than memory (issue 15).

A ``WeightSource`` gives any weight of a model by its Hugging Face name, in float32, reading only
that tensor, with one positioned read (not through a memory map, whose pages would stay in the
resident set): from safetensors files, in their stored dtype (bf16, fp16 or fp32) until
converted; or from a GGUF file, dequantized one tensor at a time and put in transformers'
layout (the same processing transformers' whole-file loader applies: Llama's q and k rows
un-permuted). ``skeleton`` builds the model with every parameter on the meta device (no memory);
``materialize`` fills one module's parameters from a source and ``release`` returns them to meta,
so that only the module at work is held. ``LayerWeights`` does that for the decoder layers of a
calibration stream (calibration.LayerStream): read each layer before its turn, and after it, write
it (changed by pruning) as its checkpoint shard, then let it go.

A checkpoint is written as one safetensors shard for everything outside the decoder layers and
one per layer (``shard_names``), by the same function whether the model is in memory or streamed,
so the two paths write the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mosaic_export.core.errors import UserError


class SafetensorsSource:
    """The weights of safetensors files (a folder's model.safetensors or its shards), each tensor
    read with one positioned read. Not memory-mapped: the pages of a mapped file that a pass has
    read stay in the process's resident set while the file is open, which over a whole pass is the
    whole model."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, entry in header.items():
                if name != "__metadata__":
                    start, end = entry["data_offsets"]
                    self._where[name] = (Path(f), entry["dtype"], entry["shape"], 8 + n + start, end - start)

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, size = self._where[name]
        data = read_at(path, offset, size, name)
        return torch.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape).float()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a tensor (its first dimension), reading only those."""
        path, dtype, shape, offset, size = self._where[name]
        row = size // shape[0]
        data = read_at(path, offset + start * row, (stop - start) * row, name)
        return torch.frombuffer(data, dtype=_DTYPES[dtype]).reshape(stop - start, *shape[1:]).float()


def read_at(path: Path, offset: int, size: int, name: str) -> bytearray:
    """size bytes of path from offset (in several reads: Linux gives at most about 2 GiB a read)."""
    data = bytearray(size)
    view, done = memoryview(data), 0
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        while done < size:
            n = fh.readinto(view[done:])
            if not n:
                raise UserError(f"{path}: {name} is cut short")
            done += n
    return data


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class GGUFSource:
    """The weights of a GGUF file, dequantized one at a time, named and laid out as transformers
    names and lays them out for ``model`` (a skeleton of the architecture the file holds)."""

    def __init__(self, gguf_file: Path, model: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        reader, self._path = GGUFReader(gguf_file), gguf_file
        cfg = model.config
        architecture = cfg.model_type
        config = {"num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)}
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        mapping = get_gguf_hf_weights_map(model)
        # where each tensor is, and not the reader: its parsed vocabulary holds about 150 MiB for a
        # 49,152-token one
        self._tensors: dict[str, _GGUFTensor] = {}
        for tensor in reader.tensors:
            hf = mapping.get(tensor.name)
            if hf is not None:
                self._tensors[hf] = _GGUFTensor(tensor.name, int(tensor.data_offset), int(tensor.n_bytes),
                                                tensor.data.dtype, tuple(tensor.data.shape),
                                                tensor.tensor_type)
        if cfg.tie_word_embeddings:
            self._tensors.pop("lm_head.weight", None)
        del reader

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self._tensors[name].shape[0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop (of the first dimension in transformers' layout, the last in
        GGUF's), reading and dequantizing only those: a row is whole quantization blocks. The
        processing is the whole tensor's, applied to the rows: right for the tables, the only
        tensors read in rows (q and k, which Llama's processing permutes, are read whole)."""
        import numpy as np
        from gguf import dequantize

        t = self._tensors[name]  # read from the file, not through a map
        row = t.n_bytes // t.shape[0]
        data = read_at(self._path, t.offset + start * row, (stop - start) * row, name)
        stored = np.frombuffer(data, dtype=t.dtype).reshape(stop - start, *t.shape[1:])
        weights = dequantize(stored, t.type)
        weights = self._processor.process(weights=weights, name=t.name).weights
        return torch.from_numpy(np.asarray(weights, dtype=np.float32))


@dataclass(frozen=True)
class _GGUFTensor:
    name: str  # in the file
    offset: int
    n_bytes: int
    dtype: object  # numpy's, of the stored data (uint8 for a quantized type)
    shape: tuple[int, ...]  # of the stored data, as gguf-py's reader gives it
    type: object  # gguf.GGMLQuantizationType


def skeleton(config) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (no memory) and its
    buffers (rotary frequencies, embedding scales) real: nothing else allocated until
    ``materialize``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def materialize(module: nn.Module, prefix: str, source) -> None:
    """Fill module's parameters (named ``prefix`` + their name in module) from source."""
    for name, param in list(module.named_parameters(recurse=True)):
        owner, leaf = _owner(module, name)
        full = prefix + name
        try:
            value = source.get(full)
        except KeyError:
            raise UserError(f"the weights have no {full}") from None
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{full}: shape {tuple(value.shape)} in the weights, "
                            f"{tuple(param.shape)} in the model")
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def materialize_outside(model: nn.Module, layers: str, source) -> None:
    """Fill from source the parameters that are neither in a decoder layer (``layers``: their
    prefix) nor in the embedding or output table (read a chunk at a time: table_chunks):
    the final norm, and whatever else a model keeps outside its layers."""
    tables = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
              for p in m.parameters()}
    for name, param in list(model.named_parameters()):
        if not name.startswith(layers) and id(param) not in tables:
            owner, leaf = _owner(model, name)
            owner._parameters[leaf] = nn.Parameter(source.get(name), requires_grad=False)


def release(module: nn.Module) -> None:
    """Return module's parameters to the meta device (their memory freed)."""
    for name, param in list(module.named_parameters(recurse=True)):
        owner, leaf = _owner(module, name)
        owner._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def shard_names(n_layers: int) -> list[str]:
    """The checkpoint's shards: the first for everything outside the decoder layers (embedding,
    final norm, output layer), then one per layer."""
    return [f"model-{k:05d}-of-{n_layers + 1:05d}.safetensors" for k in range(1, n_layers + 2)]


TABLE_CHUNK = 16 * 2**20  # bytes of a table's rows read, scored or written at a time


def table_module(model: nn.Module, which: str) -> nn.Module:
    """The embedding ("input") or output ("output") layer; a tied output layer is the embedding."""
    tied = model.config.tie_word_embeddings
    return model.get_input_embeddings() if which == "input" or tied else model.get_output_embeddings()


def chunk_rows(width: int) -> int:
    """Rows of float32 of this width in one chunk of TABLE_CHUNK bytes (at least one)."""
    return max(1, TABLE_CHUNK // (width * 4))


def table_chunks(model: nn.Module, weights: LayerWeights | None, which: str,
                 wanted: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows) of a table (``which``: see table_module), TABLE_CHUNK bytes at a
    time, in order: sliced from the model, or, for a streamed model (``weights``), read from its
    files, so that the table is never held whole. ``wanted`` (row ids): only chunks with one."""
    weight = table_module(model, which).weight
    n, width = weight.shape
    step = chunk_rows(width)
    name = weights.table_name(which) if weights is not None else None
    for start in range(0, n, step):
        stop = min(start + step, n)
        if wanted is not None and not bool(((wanted >= start) & (wanted < stop)).any()):
            continue
        if weights is None:
            yield start, weight.detach()[start:stop].float()
        else:
            yield start, weights.outside.rows(name, start, stop)


@dataclass(frozen=True)
class Rows:
    """A float32 tensor written chunk by chunk (a table: see table_chunks)."""

    shape: tuple[int, ...]
    chunks: object  # () -> an iterator of float32 tensors, whose rows make the tensor in order


def table_rows(model: nn.Module, weights: LayerWeights | None, which: str) -> Rows:
    """A table (see table_module) as a Rows: written a chunk at a time (table_chunks)."""
    weight = table_module(model, which).weight
    return Rows(tuple(weight.shape), lambda: (rows for _, rows in table_chunks(model, weights, which)))


_NAMES = {v: k for k, v in _DTYPES.items()}


def write_shard(path: Path, tensors: dict[str, torch.Tensor | Rows]) -> int:
    """One safetensors file (the length of its JSON header, the header, then the tensors' bytes
    in the header's order, names sorted); a Rows written a chunk at a time. Returns the bytes of
    its tensors."""
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        shape, dtype = (t.shape, torch.float32) if isinstance(t, Rows) else (t.shape, t.dtype)
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(tensors):
            t = tensors[name]
            for part in (t.chunks() if isinstance(t, Rows) else [t]):
                fh.write(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset


def _nonzero(layer: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in layer.parameters())


def layer_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: t for name, t in layer.state_dict().items()}


class LayerWeights:
    """A streamed model's decoder layers: read from ``source`` before each layer's turn in a
    calibration pass and let go after it; with ``sink`` set (a folder), each layer is first
    written there as its checkpoint shard, and once the pass is over the layers are read from
    there (``finish``)."""

    def __init__(self, source, prefix: str, n_layers: int, model: nn.Module):
        self.source, self.prefix, self.n_layers, self.model = source, prefix, n_layers, model
        self.outside = source  # the embedding and output tables stay read from the model's files
        self.sink: Path | None = None  # where the pass at work writes the layers
        # the run's temporary folder: the layers a pass writes, the calibration states
        # (calibration.SpilledStates); removed at the end of the run
        self.work: Path | None = None
        self.written: list[Path] = []
        # each layer's non-zero weights as last read or written: what is on disk (model_io.decoder_counts)
        self.nonzero: dict[int, int] = {}

    def table_name(self, which: str) -> str:
        """The name of a table's weight (see table_module) in the model's files."""
        module = table_module(self.model, which)
        return next(n for n, m in self.model.named_modules() if m is module) + ".weight"

    @contextlib.contextmanager
    def embedding_rows(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """The embedding holding only the rows of ``ids`` (read a chunk at a time) for the time of
        the block, which gets ``ids`` renumbered into them: the model embeds those as it would
        ``ids`` with its whole table."""
        module = self.model.get_input_embeddings()
        used = ids.unique()  # sorted
        if used.numel() and not 0 <= int(used[0]) <= int(used[-1]) < module.weight.shape[0]:
            raise UserError(f"token ids {int(used[0])}..{int(used[-1])} outside the embedding's "
                            f"{module.weight.shape[0]} rows")
        parts = [rows[used[(used >= start) & (used < start + len(rows))] - start]
                 for start, rows in table_chunks(self.model, self, "input", wanted=used)]
        whole = module._parameters["weight"]  # on the meta device (a tied output layer's too)
        # the padding row's index means nothing in the smaller table (it only stops gradients)
        padding = getattr(module, "padding_idx", None)
        held = torch.cat(parts) if parts else torch.empty(0, whole.shape[1])
        module._parameters["weight"] = nn.Parameter(held, requires_grad=False)
        module.padding_idx = None
        try:
            yield torch.searchsorted(used, ids)
        finally:
            module._parameters["weight"], module.padding_idx = whole, padding

    def open(self, i: int, layer: nn.Module) -> None:
        materialize(layer, f"{self.prefix}{i}.", self.source)
        self.nonzero[i] = _nonzero(layer)

    def close(self, i: int, layer: nn.Module) -> None:
        if self.sink is not None:
            path = self.sink / shard_names(self.n_layers)[i + 1]
            write_shard(path, layer_tensors(layer, f"{self.prefix}{i}."))
            self.written.append(path)
            self.nonzero[i] = _nonzero(layer)
        release(layer)

    @contextlib.contextmanager
    def held(self, layers: list[tuple[int, nn.Module]]) -> Iterator[None]:
        """These (index, layer) read for the time of the block, let go after it (not written)."""
        try:
            for i, layer in layers:
                self.open(i, layer)
            yield
        finally:
            for _, layer in layers:
                release(layer)

    def finish(self) -> None:
        """After a pass that wrote every layer: read the layers from what it wrote."""
        if len(self.written) != self.n_layers:
            raise RuntimeError(f"{len(self.written)} of {self.n_layers} layers written")
        self.source = SafetensorsSource(self.written)
        self.sink = None

    def move(self, folder: Path) -> None:
        """Move the layer shards the last pass wrote into folder (the checkpoint), and read the
        layers from there."""
        moved = []
        for path in self.written:
            moved.append(folder / path.name)
            shutil.move(path, moved[-1])
        self.written = moved
        self.source = SafetensorsSource(moved)
