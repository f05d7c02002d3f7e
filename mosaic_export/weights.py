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
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import UserError


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

        self._reader, self._path = GGUFReader(gguf_file), gguf_file
        cfg = model.config
        architecture = cfg.model_type
        config = {"num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)}
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        mapping = get_gguf_hf_weights_map(model)
        self._tensors = {}
        for tensor in self._reader.tensors:
            hf = mapping.get(tensor.name)
            if hf is not None:
                self._tensors[hf] = tensor
        if cfg.tie_word_embeddings:
            self._tensors.pop("lm_head.weight", None)

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._tensors[name]  # read from the file, not through its map
        data = read_at(self._path, int(tensor.data_offset), int(tensor.n_bytes), name)
        stored = np.frombuffer(data, dtype=tensor.data.dtype).reshape(tensor.data.shape)
        weights = dequantize(stored, tensor.tensor_type)
        weights = self._processor.process(weights=weights, name=tensor.name).weights
        return torch.from_numpy(np.asarray(weights, dtype=np.float32))


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
    prefix) nor in the embedding or output table (LayerWeights.tables reads those when needed):
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


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """One safetensors shard; the bytes of its tensors."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
        self.work: Path | None = None  # a temporary folder holding them, removed at the end of a run
        self.written: list[Path] = []
        self._holds: dict[int, int] = {}  # id(table module) -> how many blocks hold it

    @contextlib.contextmanager
    def tables(self, *which: str) -> Iterator[None]:
        """The embedding ("input") and output layer ("output") tables read for the time of the
        block (a tied output layer is the embedding's table), nested holds counted."""
        model = self.model
        tied = model.config.tie_word_embeddings
        modules = {"input": model.get_input_embeddings(),
                   "output": model.get_input_embeddings() if tied else model.get_output_embeddings()}
        chosen = list({id(modules[w]): modules[w] for w in which}.values())
        names = {id(m): n for n, m in model.named_modules()}
        taken = []
        try:
            for m in chosen:
                if self._holds.get(id(m), 0) == 0:
                    materialize(m, names[id(m)] + ".", self.outside)
                self._holds[id(m)] = self._holds.get(id(m), 0) + 1
                taken.append(m)
            if tied:
                model.tie_weights()
            yield
        finally:
            for m in taken:
                self._holds[id(m)] -= 1
                if self._holds[id(m)] == 0:
                    release(m)
            if tied:
                model.tie_weights()

    def open(self, i: int, layer: nn.Module) -> None:
        materialize(layer, f"{self.prefix}{i}.", self.source)

    def close(self, i: int, layer: nn.Module) -> None:
        if self.sink is not None:
            path = self.sink / shard_names(self.n_layers)[i + 1]
            write_shard(path, layer_tensors(layer, f"{self.prefix}{i}."))
            self.written.append(path)
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
