"""The ONNX target's table: its dtypes, providers, file names, quantization blocks and parity
floors. Light (no torch, no onnx): the registry entry, the writer, the graph and the runners read it."""

from __future__ import annotations

from mosaic_export.model.names import GGUF_MODEL_NAMES
from mosaic_export.targets import base

DTYPES = ("fp32", "fp16", "int8", "int4")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
BITS = {"int8": 8, "int4": 4}  # weight-only MatMulNBits types: the decoder projections
OUTER_BITS = 8  # and, for both, the output layer and the embedding table (shared when tied)
NBITS_BLOCK = 32  # weights per scale, along the input dimension (MatMulNBits)
MODEL_FILE = "model.onnx"
CONFIG_FILE = "model_config.json"  # per-layer sizes, names, eos ids, chat template: for an app
GENAI_CONFIG_FILE = "genai_config.json"  # for ONNX Runtime GenAI
EMBED, OUTPUT = (f"{GGUF_MODEL_NAMES[role]}.weight" for role in ("embed", "lm_head"))  # cost model names
CONFIG_FORMAT = "mosaic-export onnx"


GATHERS = ("Gather", "GatherBlockQuantized")  # read one row a token

# fp32 must match PyTorch this closely on every logit: the fused kernels measured 1.4e-3 on
# SmolLM2-135M's parity window (at its first tokens, whose activations reach the thousands; 1e-4
# after them), on logits up to 44 (BENCHMARKS.md "ONNX with the fused operators")
MAX_FP32_LOGIT_DIFF = 5e-3
# Parity floors: the least greedy next-token agreement with PyTorch (on the parity window of real
# text) each dtype must reach, at build and in `verify`: about 4 points under the lowest of
# SmolLM2-135M dense and 30% pruned (tools/parity_floors.py, BENCHMARKS.md "Parity floors").
MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.97, "int8": 0.90, "int4": 0.70}


def check_type(dtype: str) -> str:
    return base.check_type("ONNX dtype", DTYPES, dtype)
