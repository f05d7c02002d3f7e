"""Predicting the types (and so the bytes) of a quantized GGUF file: what llama.cpp's quantizer
wants for each tensor, and what it stores when a row does not fit the wanted type's blocks."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mosaic_export.model.folder import LoadedModel
from mosaic_export.targets.gguf.runner import quantize
from mosaic_export.targets.gguf.table import FLOAT_TYPES, check_type
from mosaic_export.targets.gguf.writer import tensor_types, tensors, write_gguf

# llama.cpp's substitutes when a row length is not a multiple of the wanted type's block
# (tensor_type_fallback in llama-quant.cpp); F16 when the substitute does not fit either.
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}


def intended_types(loaded: LoadedModel, quant: str) -> dict[str, str]:
    """The type llama.cpp's quantizer wants for each tensor of this model (name -> GGML type),
    before any fallback for row length: read from the quantization of a stand-in file that has
    the model's metadata and tensor names but tiny tensors and no tokenizer (0.1 s for
    SmolLM2-135M instead of a real export).
    The rules (more bits for some layers' attn_v and ffn_down, the output layer, ...) depend on
    the tensor's name and the layer count, which the stand-in keeps."""
    check_type(quant)
    if quant in FLOAT_TYPES:
        return {name: (quant if t.dim() == 2 else "F32") for name, t in tensors(loaded, read=False)}
    work = Path(tempfile.mkdtemp(prefix=".gguf-types-"))
    try:
        write_gguf(loaded, work / "standin.gguf", "F32", standin=True)
        quantize(work / "standin.gguf", work / "q.gguf", quant,  # in a child, as every llama.cpp call
                 f"{quant} the stand-in file that tells each tensor's type")
        return {name: t for name, (t, _) in tensor_types(work / "q.gguf").items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolved_type(intended: str, row_length: int) -> str:
    """The type llama.cpp stores when it wants ``intended`` for rows of ``row_length``."""
    import gguf

    def block(t: str) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]

    if row_length % block(intended) == 0:
        return intended
    substitute = FALLBACK.get(intended, "F16")
    return substitute if row_length % block(substitute) == 0 else "F16"


def tensor_bytes(ggml_type: str, rows: int, row_length: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return rows * (row_length // block) * size
