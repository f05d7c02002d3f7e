"""GGUF target: the resized model written with gguf-py, quantized by llama.cpp's own quantizer.

llama.cpp reads head_count, head_count_kv and feed_forward_length as per-layer arrays, but only
arch ``deci`` builds each layer's tensors at its own sizes; the others (``llama``, ``qwen3``,
``gemma3``) use layer 0's sizes for all. So the architecture's own GGUF arch (ArchSpec.gguf_arch)
is written when every layer has one size, and ``deci`` with exact arrays when they differ, where
the architecture is a Llama block (llama, mistral, phi3 split on load; qwen2 always: llama.cpp's
qwen2 assumes heads x head size = hidden, deci reads any sizes and the biases); Qwen3 and Gemma 3
layers of different sizes are refused. Head size stays global
(key_length / value_length). For ``llama`` and ``deci`` (PAIRED_ROPE) the Q and K rows (and
biases) get llama.cpp's rotary permutation, per layer with that layer's head counts.

Float types (F32, F16, BF16) are written directly, and so is Q8_0 when every weight's rows fit
its blocks: gguf-py's Q8_0 is bit-exact with llama.cpp's reference quantizer (a test compares the
two files), and a big model then needs no float32 copy on disk. Other quantized types (and a
Q8_0 whose rows do not fit) are made from an F32 file by ``llama_model_quantize``; k-quants need
rows (a tensor's input size) of a multiple of 256 and legacy quants of 32, otherwise llama.cpp
silently substitutes another type: every tensor's final type is read back and checked.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mosaic_export.core.errors import UserError
from mosaic_export.method.evaluate import forward_model
from mosaic_export.model.arch import attention_scale, layer_windows, rope_base, unsupported_features
from mosaic_export.model.folder import LoadedModel
from mosaic_export.model.names import BLOCK_NORM, GGUF_MODEL_NAMES, GGUF_NAMES, PROJECTIONS
from mosaic_export.model.weights import Rows, chunk_rows, table_module, table_rows
from mosaic_export.targets.base import Evaluation
from mosaic_export.targets.gguf.runner import next_token_agreement, quantize
from mosaic_export.targets.gguf.table import (
    DIRECT_TYPES,
    FLOAT_TYPES,
    K_QUANT_BLOCK,
    MIN_AGREEMENT,
    alignment,
    check_layer_sizes,
    check_type,
)
from mosaic_export.targets.gguf.tokenizer import tokenizer_check, tokenizer_fields, tokenizer_probe

# llama.cpp's file_type values (enum llama_ftype).
FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}
BYTE_TYPES = ("BF16", "Q8_0")  # made by gguf-py's quants, a chunk of rows at a time (temporaries)
# llama.cpp's Gemma 3 (llama-model.cpp) fixes what the config may vary: every 6th layer sees the
# whole context, the others a sliding window with rotary base 10000; scores scaled by 1/sqrt(head).
GEMMA3_FULL_EVERY, GEMMA3_LOCAL_BASE = 6, 10000.0
# Architectures whose rope rotates pairs (2i, 2i+1): Q and K rows are permuted from Hugging Face's
# halves (rotary_permute), biases too (qwen2 is written as deci); qwen3 and gemma3 (NEOX rope) take
# the halves as they are.
PAIRED_ROPE = ("llama", "deci")


def gguf_arch(loaded: LoadedModel) -> str:
    """llama.cpp's architecture name for the model: the spec's, or its per-layer one (deci) when
    the layers differ in size."""
    import gguf

    spec, uniform = loaded.spec, len(set(loaded.layer_dims)) == 1
    biases = any(loaded.shape.bias.values())  # read by llama.cpp's deci, tested here
    arch = spec.gguf_arch if uniform and not biases else spec.gguf_per_layer
    if arch is None and uniform:
        raise UserError(f"GGUF export of {loaded.shape.model_type} with projection biases is not "
                        "supported; export with --target onnx")
    if arch is None:
        check_layer_sizes(loaded, may_differ=True)
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]]


def arch_problems(loaded: LoadedModel, arch: str) -> list[str]:
    """What llama.cpp's architecture would compute differently from the model."""
    import gguf

    shape, cfg, spec = loaded.shape, loaded.model.config, loaded.spec
    problems = unsupported_features(cfg, spec)
    names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    missing = [role for role in (*spec.norms, *PROJECTIONS) if GGUF_NAMES[role] not in names]
    if missing:
        problems.append(f"tensors {', '.join(missing)} in arch {arch}")
    if any(shape.bias.values()) and arch != "deci":
        problems.append("projections with biases")
    if arch == "gemma3":
        windows = layer_windows(cfg)
        if [w is None for w in windows] != [(i + 1) % GEMMA3_FULL_EVERY == 0 for i in range(len(windows))]:
            problems.append(f"a sliding-window pattern other than llama.cpp's (every "
                            f"{GEMMA3_FULL_EVERY}th layer full)")
        if rope_base(cfg, windows[0]) != GEMMA3_LOCAL_BASE:
            problems.append(f"a local rotary base other than {GEMMA3_LOCAL_BASE:g}")
        if attention_scale(cfg, shape.head_dim) != shape.head_dim ** -0.5:
            problems.append("query_pre_attn_scalar other than head_dim")
    return problems


def check_exportable(loaded: LoadedModel) -> None:
    arch = gguf_arch(loaded)
    problems = arch_problems(loaded, arch)
    if problems:
        raise UserError(f"GGUF export ({arch}) of {'; '.join(problems)} is not supported")
    if any(d.n_head == 0 for d in loaded.layer_dims) and arch != "deci":
        raise UserError(f"GGUF export ({arch}) of removed blocks is not supported: llama.cpp reads "
                        "them in deci only")


def context_length(cfg, arch: str) -> int:
    """The trained context, or a sliding window's width where llama.cpp's architecture has no
    window (all but gemma3): up to there both compute the same attention."""
    windows = [w for w in layer_windows(cfg) if w is not None]
    full = cfg.max_position_embeddings
    return min([full, *windows]) if windows and arch != "gemma3" else full


def rotary_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout (two halves per head) -> llama.cpp's (interleaved pairs): rows of one
    head h, [h0 .. h(d/2-1) | h(d/2) .. h(d-1)] become [h0, h(d/2), h1, h(d/2+1), ...]."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(loaded: LoadedModel, read: bool = True) -> Iterator[tuple[str, torch.Tensor | Rows]]:
    """(GGUF name, float32 tensor) pairs in llama.cpp's layout; the embedding and output tables as
    weights.Rows, written a chunk of rows at a time. A streamed model's layers are read one at a
    time; with ``read`` False nothing is read, and every tensor is the model's own (on the meta
    device where streamed: shapes only)."""
    model, spec = loaded.model, loaded.spec
    permute = gguf_arch(loaded) in PAIRED_ROPE
    streamed = read and loaded.weights is not None
    yield f"{GGUF_MODEL_NAMES['embed']}.weight", _table(loaded, "input", read)
    for bid, (layer, dims) in enumerate(zip(spec.layer_list(model), loaded.layer_dims, strict=True)):
        with loaded.weights.held([(bid, layer)]) if streamed else contextlib.nullcontext():
            yield from _layer_tensors(spec, layer, bid, dims, permute)
    final = model.get_submodule(spec.final_norm)
    yield f"{GGUF_MODEL_NAMES['final_norm']}.weight", spec.norm_weight(final)
    if not loaded.shape.tied_embeddings:
        yield f"{GGUF_MODEL_NAMES['lm_head']}.weight", _table(loaded, "output", read)


def _table(loaded: LoadedModel, which: str, read: bool) -> torch.Tensor | Rows:
    if not read:
        return table_module(loaded.model, which).weight
    return table_rows(loaded.model, loaded.weights, which)


def _layer_tensors(spec, layer, bid: int, dims, permute: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's (GGUF name, tensor) pairs."""
    gone = {BLOCK_NORM[b] for b in ("attention", "mlp") if spec.absent(layer, b)}
    for norm, path in spec.norms.items():  # llama.cpp's Gemma reads the offset scale
        if norm not in gone:  # a removed block's norm went with it
            yield (GGUF_NAMES[norm].format(bid=bid) + ".weight",
                   spec.norm_weight(layer.get_submodule(path)))
    heads = {"q": dims.n_head, "k": dims.n_kv}
    for p in spec.present(layer):
        linear = spec.projection(layer, p)
        for kind in ("weight", "bias"):
            t = getattr(linear, kind)
            if t is not None and p in heads and permute:
                t = rotary_permute(t, heads[p])
            if t is not None:
                yield GGUF_NAMES[p].format(bid=bid) + f".{kind}", t


def write_gguf(loaded: LoadedModel, path: Path, dtype: str = "F32", standin: bool = False) -> None:
    """Write the model as a GGUF file of one of DIRECT_TYPES at path (Q8_0: every 2-D tensor's rows
    a multiple of its block, see direct).

    ``standin``: every 2-D tensor is replaced by zeros of STANDIN_SHAPE, every 1-D one by zeros,
    and the tokenizer is left out (the other metadata and the names stay; no weight is read): a
    small file on which llama.cpp's quantizer
    shows the type it wants per tensor, read back in a fraction of a second (a 49,152-token
    vocabulary takes gguf-py seconds to parse, twice per pricing)."""
    import gguf

    if dtype not in DIRECT_TYPES:
        raise ValueError(f"expected one of {DIRECT_TYPES}, got {dtype}")
    check_exportable(loaded)
    arch, shape, cfg = gguf_arch(loaded), loaded.shape, loaded.model.config
    dims = loaded.layer_dims
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(Path(loaded.source).stem)
    w.add_file_type(FILE_TYPE[dtype])
    if dtype not in FLOAT_TYPES:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(context_length(cfg, arch))
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.n_layers)
    per_layer = arch == "deci"
    w.add_feed_forward_length([d.n_ff for d in dims] if per_layer else dims[0].n_ff)
    w.add_head_count([d.n_head for d in dims] if per_layer else dims[0].n_head)
    w.add_head_count_kv([d.n_kv for d in dims] if per_layer else dims[0].n_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(rope_base(cfg, None))
    if arch == "gemma3":
        w.add_sliding_window(min(x for x in layer_windows(cfg) if x is not None))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(shape.vocab)
    if not standin:  # the quantizer's choice of types does not read the vocabulary
        tokenizer_fields(loaded, w)
    for name, t in tensors(loaded, read=False):  # the tensor infos, from shapes alone
        w.add_tensor_info(name, *_tensor_info(tuple(t.shape), dtype, standin))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t in tensors(loaded, read=not standin):  # then the data, a tensor (a layer) at a time
        w.write_tensor_data(_tensor_data(t, dtype, standin))
    w.close()


def _tensor_info(shape: tuple[int, ...], dtype: str, standin: bool):
    """(shape, numpy dtype, bytes, raw GGML type) of what _tensor_data writes for a tensor of shape."""
    import gguf

    if len(shape) == 2:
        shape = STANDIN_SHAPE if standin else shape
        n = shape[0] * shape[1]
        if dtype == "F16":
            return shape, np.dtype(np.float16), 2 * n, None
        if dtype in BYTE_TYPES:  # written as bytes
            qtype = gguf.GGMLQuantizationType[dtype]
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype
    return shape, np.dtype(np.float32), 4 * int(np.prod(shape)), None


def _tensor_data(t: torch.Tensor | Rows, dtype: str, standin: bool) -> np.ndarray | _Chunks:
    """The tensor as written: 2-D ones in the file's type (zeros of STANDIN_SHAPE for a stand-in),
    1-D ones (norms, biases) in F32 in every type, as llama.cpp keeps them. Tables, and in
    BYTE_TYPES every 2-D tensor, are encoded a chunk of rows at a time."""
    if standin:  # types only: nothing is read (a streamed model's weights stay on disk)
        return _encoded(np.zeros(STANDIN_SHAPE if len(t.shape) == 2 else tuple(t.shape), np.float32), dtype)
    if isinstance(t, Rows) or (dtype in BYTE_TYPES and t.dim() == 2):
        rows = t if isinstance(t, Rows) else _row_chunks(t)
        return _Chunks(_tensor_info(rows.shape, dtype, False)[2],
                       lambda: (_encoded(part.detach().float().numpy(), dtype) for part in rows.chunks()))
    return _encoded(t.detach().float().numpy(), dtype)


def _encoded(data: np.ndarray, dtype: str) -> np.ndarray:
    """float32 data in the file's type (1-D data stays F32)."""
    import gguf

    if data.ndim != 2 or dtype == "F32":
        return np.ascontiguousarray(data)
    if dtype == "F16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[dtype])


def _row_chunks(t: torch.Tensor) -> Rows:
    """A 2-D tensor as Rows of TABLE_CHUNK bytes of float32."""
    step = chunk_rows(t.shape[1])
    return Rows(tuple(t.shape), lambda: (t[i:i + step] for i in range(0, t.shape[0], step)))


@dataclass
class _Chunks:
    """A tensor's data, written to the file a chunk of rows at a time: what gguf-py's
    write_tensor_data uses of an array (its size, and ``tofile``)."""

    nbytes: int
    parts: object  # () -> iterator of arrays, in the file's type, whose rows make the tensor

    def tofile(self, fout) -> None:
        for part in self.parts():
            part.tofile(fout)


def tensor_types(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (GGML type name, shape as llama.cpp lists it: [row length, rows])."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}


# --- predicting the types (and so the bytes) of a quantized file --------------------------------

STANDIN_SHAPE = (32, K_QUANT_BLOCK)  # rows, row length: fits every type's block
@dataclass
class TypeCheck:
    types: dict[str, str]  # every tensor's final type
    fallbacks: list[str]  # block weights whose rows do not fit the requested type's blocks

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))


def check_types(path: Path, quant: str) -> TypeCheck:
    """Read back every tensor's type; list the block weights llama.cpp had to store in another
    type because their row length is not a multiple of the requested type's block."""
    found = tensor_types(path)
    block = alignment(quant)
    fallbacks = [name for name, (_, shape) in found.items()
                 if name.startswith("blk.") and len(shape) == 2 and shape[0] % block]
    return TypeCheck({n: t for n, (t, _) in found.items()}, fallbacks)


def direct(loaded: LoadedModel, quant: str) -> bool:
    """Whether gguf-py writes the type itself: a float, or Q8_0 where every 2-D tensor's rows are
    whole blocks (llama.cpp's quantizer would store the others in another type)."""
    if quant in FLOAT_TYPES:
        return True
    return quant in DIRECT_TYPES and all(
        len(t.shape) != 2 or t.shape[1] % alignment(quant) == 0 for _, t in tensors(loaded, read=False))


def export(loaded: LoadedModel, path: Path, quant: str = "F32") -> TypeCheck:
    """Write path (DIRECT_TYPES directly, other quant types through llama.cpp) and check its types."""
    check_type(quant)
    check_exportable(loaded)
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=path.parent))
    try:
        if direct(loaded, quant):
            write_gguf(loaded, work / "model.gguf", quant)
        else:
            write_gguf(loaded, work / "f32.gguf", "F32")
            quantize(work / "f32.gguf", work / "model.gguf", quant)  # in a child process
        check = check_types(work / "model.gguf", quant)
        (work / "model.gguf").replace(path)
        return check
    finally:
        shutil.rmtree(work, ignore_errors=True)



def check_parity(quant: str, parity: dict, name: str, source_ids: list[int] | None = None) -> None:
    """The type's agreement floor, and (when given) the source tokenizer's ids of the probe text
    against llama.cpp's: a UserError naming the file when either fails."""
    floor = MIN_AGREEMENT[quant]
    if not parity["top1_agreement"] >= floor:
        raise UserError(f"{name} disagrees with PyTorch: greedy next token agrees at "
                        f"{parity['top1_agreement']:.1%} of {parity['positions']} positions "
                        f"(floor for {quant}: {floor:.0%})")
    if source_ids is not None and parity.get("text_ids") is not None:
        cpp = parity["text_ids"]
        if cpp != source_ids:
            at = next((i for i, (a, b) in enumerate(zip(cpp, source_ids, strict=False)) if a != b),
                      min(len(cpp), len(source_ids)))
            raise UserError(f"{name}: llama.cpp tokenizes text differently from the source tokenizer "
                            f"(first difference at token {at}: {cpp[at:at + 3]} vs "
                            f"{source_ids[at:at + 3]}); the GGUF's tokenizer metadata is wrong")


def deploy(loaded: LoadedModel, path: Path, quant: str, parity_ids: torch.Tensor,
           evaluation: Evaluation) -> dict:
    """Export, load it back in llama.cpp, compare with PyTorch (logits and tokenizer ids)."""

    check = export(loaded, path, quant)
    probe = tokenizer_probe()
    parity = next_token_agreement(forward_model(loaded), path, parity_ids, evaluation.threads, text=probe,
                                  source_gguf=loaded.gguf_file)
    tokenizer = tokenizer_check(loaded, parity, probe)
    check_parity(quant, parity, path.name, tokenizer["ids"])
    parity["tokenizer_ids_match"] = parity.pop("text_ids") == tokenizer["ids"]
    parity.pop("source_text_ids", None)
    parity["tokenizer_probe"] = tokenizer
    parity["min_agreement"] = MIN_AGREEMENT[quant]
    return {"file": path.name, "arch": gguf_arch(loaded), "type": quant,
            "tensor_types": check.summary(), "fallbacks": check.fallbacks, "parity": parity}
