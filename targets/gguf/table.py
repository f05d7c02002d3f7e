"""The GGUF target's table: its types, their blocks, the parity floors, the run context. Light
(no torch, no gguf-py): the registry entry, the writer, the runner and pricing all read it here."""

from __future__ import annotations

from mosaic_export.core.errors import UserError
from mosaic_export.targets import base

GENERATE_CONTEXT = 2048  # llama.cpp context for `run`: prompt and answer
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
TYPES = FLOAT_TYPES + QUANT_TYPES
K_QUANT_BLOCK, LEGACY_BLOCK = 256, 32
# Types gguf-py writes itself, as llama.cpp's quantizer would (the floats, and Q8_0).
DIRECT_TYPES = (*FLOAT_TYPES, "Q8_0")

# Parity floors: the least greedy next-token agreement with PyTorch (on the parity window of real
# text) a file of each type must reach, at build and in `verify`: about 4 points under the lowest
# of SmolLM2-135M dense and 30% pruned (tools/parity_floors.py, BENCHMARKS.md "Parity floors");
# a broken file agrees at a few percent.
MIN_AGREEMENT = {"F32": 0.99, "F16": 0.98, "BF16": 0.97, "Q8_0": 0.92, "Q6_K": 0.90, "Q5_K_M": 0.80,
                 "Q4_K_M": 0.80, "Q4_0": 0.70}


def check_type(quant: str) -> str:
    return base.check_type("GGUF type", TYPES, quant)


def alignment(quant: str) -> int:
    """Row-length multiple a type needs: 256 for k-quants, 32 for legacy quants, 1 for floats."""
    if quant in FLOAT_TYPES:
        return 1
    return K_QUANT_BLOCK if "_K" in quant else LEGACY_BLOCK


def check_layer_sizes(loaded, may_differ: bool) -> None:
    """llama.cpp reads layers of different sizes only through a per-layer architecture (deci)."""
    if may_differ and loaded.spec.gguf_per_layer is None:
        raise UserError(f"llama.cpp cannot load {loaded.shape.model_type} layers of different "
                        "sizes; prune with --allocation uniform (every layer the same sizes) "
                        "or export with --target onnx")
