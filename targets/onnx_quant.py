"""Weight-only int8 / int4 for the ONNX graph (onnx_graph.py), in ONNX Runtime's own operators.

- Every decoder projection: MatMulNBits at the dtype's bits (onnxruntime's quantizer: symmetric,
  one float32 scale per block of NBITS_BLOCK inputs; accuracy level 4 computes with int8
  activations quantized per block, onnxruntime's fast CPU path). Chosen over quantize_dynamic,
  whose one activation scale per tensor lost too much on SmolLM2 (BENCHMARKS.md).
- The output layer: MatMulNBits at OUTER_BITS (8) for int4 too, as llama.cpp's Q4_K_M keeps its
  output at Q6_K: it is one matrix, and the most sensitive one.
- The embedding table: GatherBlockQuantized at OUTER_BITS. Tied to the output layer, it reads the
  output layer's quantized matrix itself (one copy of the table, as GenAI's builder does for
  shared embeddings); untied, its own blocks, quantized here the same way (symmetric, blocks of
  NBITS_BLOCK, zero point 2^(bits-1) as GatherBlockQuantized reads uint8 data).
"""

from __future__ import annotations

import logging

import numpy as np

from .onnx_graph import MS
from .onnx_target import BITS, NBITS_BLOCK, OUTER_BITS

EMBED = "embed_tokens.weight"
OUTPUT = "lm_head.weight_t"


def quantize(proto, dtype: str, tied: bool):
    """The fp32 graph with its weights quantized for dtype (int8 / int4)."""
    head = next(n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] == OUTPUT)
    proto = _matmul_nbits(proto, BITS[dtype], exclude=[head])
    proto = _matmul_nbits(proto, OUTER_BITS, exclude=[])  # what is left: the output layer
    _quantized_embedding(proto, tied)
    return proto


def _matmul_nbits(proto, bits: int, exclude: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=NBITS_BLOCK, is_symmetric=True,
                                         accuracy_level=4, nodes_to_exclude=exclude)
        quantizer.process()
    finally:
        logging.getLogger().setLevel(level)
    return quantizer.model.model


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


def _quantized_embedding(proto, tied: bool) -> None:
    """Replace the float embedding lookup with GatherBlockQuantized (see the module's docstring)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    index, gather = next((i, n) for i, n in enumerate(graph.node)
                         if n.op_type == "Gather" and n.input[0] == EMBED)
    table = numpy_helper.to_array(inits[EMBED])
    nodes = []
    if tied:
        head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(OUTPUT))
        weight, scales = head.input[1], head.input[2]
        rows, blocks, blob = inits[weight].dims
        shape = numpy_helper.from_array(np.array([rows, blocks * blob], np.int64), "embed_tokens.codes_shape")
        graph.initializer.append(shape)
        data = "embed_tokens.codes"
        nodes.append(helper.make_node("Reshape", [weight, shape.name], [data], name="embed_tokens.Reshape"))
    else:
        codes, block_scales = block_quantize(table, OUTER_BITS)
        data, scales = "embed_tokens.codes", "embed_tokens.scales"
        graph.initializer.extend([numpy_helper.from_array(codes, data),
                                  numpy_helper.from_array(block_scales, scales)])
    width = table.shape[1]
    padded = -(-width // NBITS_BLOCK) * NBITS_BLOCK
    out = gather.output[0] if padded == width else "embed_tokens.padded"
    nodes.append(helper.make_node("GatherBlockQuantized", [data, gather.input[1], scales], [out], domain=MS,
                                  name="embed_tokens.GatherBlockQuantized", bits=OUTER_BITS,
                                  block_size=NBITS_BLOCK, gather_axis=0, quantize_axis=1))
    if padded != width:
        ends = numpy_helper.from_array(np.array([width], np.int64), "embed_tokens.width")
        starts = numpy_helper.from_array(np.array([0], np.int64), "embed_tokens.start")
        axes = numpy_helper.from_array(np.array([-1], np.int64), "embed_tokens.axis")
        graph.initializer.extend([starts, ends, axes])
        nodes.append(helper.make_node("Slice", [out, starts.name, ends.name, axes.name], [gather.output[0]],
                                      name="embed_tokens.Slice"))
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    graph.initializer.remove(inits[EMBED])
