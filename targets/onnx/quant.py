"""Weight-only int8 / int4 for the ONNX graph (onnx_graph.py), in ONNX Runtime's own operators,
quantized as the graph is built (so a streamed model is written a layer at a time):

- Every decoder projection: MatMulNBits at the dtype's bits, made by onnxruntime's own kernels
  (``quantize_matmul_4bits`` / ``8bits``, as its MatMulNBitsQuantizer calls them: symmetric, one
  float32 scale per block of NBITS_BLOCK inputs, the same bytes: a test compares them); accuracy
  level 4 computes with int8 activations quantized per block, onnxruntime's fast CPU path. Chosen
  over quantize_dynamic, whose one activation scale per tensor lost too much on SmolLM2
  (BENCHMARKS.md).
- The output layer: MatMulNBits at OUTER_BITS (8) for int4 too, as llama.cpp's Q4_K_M keeps its
  output at Q6_K: it is one matrix, and the most sensitive one. Each of its columns (a vocabulary
  row) is quantized alone, so it is made a chunk of vocabulary rows at a time.
- The embedding table: GatherBlockQuantized at OUTER_BITS. Tied to the output layer, it reads the
  output layer's quantized matrix itself (one copy of the table, as GenAI's builder does for
  shared embeddings); untied, its own blocks, quantized here the same way (symmetric, blocks of
  NBITS_BLOCK, zero point 2^(bits-1) as GatherBlockQuantized reads uint8 data).
"""

from __future__ import annotations

import numpy as np

from mosaic_export.targets.onnx.table import NBITS_BLOCK, OUTER_BITS

MS = "com.microsoft"  # ONNX Runtime's contrib operators
ACCURACY_LEVEL = 4


def nbits(weight_t: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight (K inputs x N outputs) as MatMulNBits stores it: packed codes (N, blocks,
    blob) and float32 scales (N, blocks), blocks of NBITS_BLOCK along K (zero rows pad the last)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight_t.shape
    blocks, per_byte = -(-rows // NBITS_BLOCK), 8 // bits
    padded = np.zeros((blocks * NBITS_BLOCK, cols), np.float32)
    padded[:rows] = weight_t
    packed = np.zeros((cols, blocks, -(-NBITS_BLOCK // per_byte)), np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), np.uint8)  # unused: symmetric
    scales = np.zeros((cols, blocks), np.float32)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, padded, scales, zero_points, NBITS_BLOCK, cols, rows, True)
    return packed, scales


def matmul_nbits(g, x: str, packed: str, scales: str, k: int, n: int, bits: int) -> str:
    """x times a quantized weight (its initializers packed and scales)."""
    return g.op("MatMulNBits", x, packed, scales, domain=MS, K=k, N=n, bits=bits, block_size=NBITS_BLOCK,
                accuracy_level=ACCURACY_LEVEL)


def block_quantize(table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) float -> uint8 codes (rows, blocks x NBITS_BLOCK) and float32 scales (rows,
    blocks): symmetric per block, code = round(w / scale) + 2^(bits-1). bits = 8 only (one code a
    byte)."""
    assert bits == 8
    rows, cols = table.shape
    blocks = -(-cols // NBITS_BLOCK)
    padded = np.zeros((rows, blocks * NBITS_BLOCK), np.float32)
    padded[:, :cols] = table
    grouped = padded.reshape(rows, blocks, NBITS_BLOCK)
    scales = np.abs(grouped).max(-1) / 127
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    codes = np.clip(np.round(grouped / safe[..., None]), -127, 127).astype(np.int16) + 128
    return codes.astype(np.uint8).reshape(rows, -1), scales.astype(np.float32)


def output_table(g, name: str, rows) -> tuple[str, str]:
    """The output layer's table (weights.Rows, vocabulary x hidden) at OUTER_BITS, made a chunk of
    vocabulary rows at a time: the names of its packed codes and scales."""
    parts = (nbits(chunk.detach().float().numpy().T, OUTER_BITS) for chunk in rows.chunks())
    return tuple(g.tables([f"{name}_Q{OUTER_BITS}", f"{name}_scales"], rows.shape[0], parts))


def embedding(g, ids: str, width: int, tied: tuple[str, str] | None, rows) -> str:
    """The embedded ids through GatherBlockQuantized: from the output layer's codes and scales
    (``tied``), else from the table's own blocks (weights.Rows, made a chunk at a time)."""
    if tied is not None:
        packed, scales = tied
        shape = g.ints(rows.shape[0], -(-width // NBITS_BLOCK) * NBITS_BLOCK)  # a code a byte
        data = g.op("Reshape", packed, shape, outputs=["embed_tokens.codes"])
    else:
        parts = (block_quantize(chunk.detach().float().numpy(), OUTER_BITS) for chunk in rows.chunks())
        data, scales = g.tables(["embed_tokens.codes", "embed_tokens.scales"], rows.shape[0], parts)
    padded = -(-width // NBITS_BLOCK) * NBITS_BLOCK
    hidden = g.op("GatherBlockQuantized", data, ids, scales, domain=MS, bits=OUTER_BITS,
                  block_size=NBITS_BLOCK, gather_axis=0, quantize_axis=1)
    if padded == width:
        return hidden
    return g.op("Slice", hidden, g.ints(0), g.ints(width), g.ints(-1))
