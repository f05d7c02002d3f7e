"""Cost model: what a plan costs on a device, in a target format, before it is built.

    memory  = base + k * weight bytes + KV cache at the context + attention and logit buffers
    decode  = 1 / (overhead + bytes read per token / effective bandwidth)      (memory bound)
    prefill = prompt / (overhead + prompt FLOPs / effective compute)           (compute bound)
    TTFT    = prefill of the prompt + one decode step

Weight bytes are exact for the format: each target (targets/) says what a tensor takes in its
files (GGUF: the type llama.cpp's quantizer will give it, with row-length fallbacks; ONNX: its
dtype's size), how wide its KV cache is and how many rows of logits a prompt computes.
Unstructured zeros cost the same as any weight in these dense formats: only structure counts.

The efficiency terms (base, k, overheads, effective bandwidth and compute) come from a
Calibration: measured on this machine by ``mosaic-export profile detect`` (a least-squares fit
over a few model sizes run in the real runtime), or nominal for a device we cannot reach (a
fraction of the datasheet figures), in which case every prediction is labelled nominal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from mosaic_export.core.errors import UserError
from mosaic_export.model.arch import LayerDims, ModelShape, arch_for
from mosaic_export.model.names import BLOCK_NORM, GGUF_MODEL_NAMES, GGUF_NAMES, PROJECTIONS
from mosaic_export.targets import Target
from mosaic_export.targets import get as get_target
from mosaic_export.targets.base import CHUNK

PROMPT_TOKENS = 512  # the benchmark protocol: decode speed after a prompt of this many tokens
GEN_TOKENS = 128

# Nominal efficiencies for devices we cannot measure: a runtime reaches about this fraction of
# the datasheet's bandwidth in decode and of its peak compute in prefill.
NOMINAL_BANDWIDTH_EFFICIENCY = 0.6
NOMINAL_COMPUTE_EFFICIENCY = 0.3


@dataclass(frozen=True)
class Format:
    target: str  # a registered target's name (targets.names())
    name: str  # its type: GGUF type (Q8_0, Q4_K_M, ...), ONNX dtype (fp32, fp16, int8, int4)

    @property
    def key(self) -> str:
        return f"{self.target}:{self.name}"

    @property
    def spec(self) -> Target:
        return get_target(self.target)

    @property
    def kv_bytes_per_value(self) -> int:
        return self.spec.kv_bytes_per_value(self.name)


@dataclass(frozen=True)
class Calibration:
    """Efficiency terms of one runtime and format on one machine."""

    decode_overhead_s: float  # per decoded token, beyond reading the weights
    bandwidth: float  # effective bytes/s while decoding
    prefill_overhead_s: float
    prefill_flops: float  # effective FLOP/s while prefilling
    memory_base: float  # bytes: the runtime itself, before weights
    memory_per_weight_byte: float  # resident bytes per byte of weights
    basis: str  # "measured" (profile detect on this machine) | "nominal" (datasheet)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def nominal(cls, target: str, bandwidth: float, compute_flops: float) -> Calibration:
        return cls(0.0, NOMINAL_BANDWIDTH_EFFICIENCY * bandwidth, 0.0,
                   NOMINAL_COMPUTE_EFFICIENCY * compute_flops, get_target(target).nominal_base, 1.0,
                   "nominal")


@dataclass(frozen=True)
class Weights:
    # bytes resident: every weight tensor of the file (not ONNX's rotary tables, positions x
    # head_dim x 4 bytes per rotary base, 2 MiB for SmolLM2: the calibrated base memory holds them)
    total: int
    per_token: int  # bytes read to decode one token: every matrix but the embedding table
    matmul_params: int  # parameters multiplied per token (embedding lookup excluded)
    output_params: int  # of which the output layer


def matrices(shape: ModelShape, dims: list[LayerDims]) -> list[tuple[str, int, int]]:
    """(GGUF name, rows, row length) of every weight tensor; 1-D tensors have one row."""
    norms = arch_for(shape.model_type).norms
    out = [(f"{GGUF_MODEL_NAMES['embed']}.weight", shape.vocab, shape.hidden)]
    for bid, d in enumerate(dims):
        gone = {BLOCK_NORM["attention"]} if d.n_head == 0 else set()
        gone |= {BLOCK_NORM["mlp"]} if d.n_ff == 0 else set()
        for p in PROJECTIONS:
            rows, cols = shape.projection_shape(p, d)
            if rows * cols == 0:  # a removed block's (blocks.py)
                continue
            out.append((GGUF_NAMES[p].format(bid=bid) + ".weight", rows, cols))
            if shape.bias[p]:
                out.append((GGUF_NAMES[p].format(bid=bid) + ".bias", 1, rows))
        for norm in (n for n in norms if n not in gone):  # q / k norms scale one head, others the state
            width = shape.head_dim if norm in ("q_norm", "k_norm") else shape.hidden
            out.append((GGUF_NAMES[norm].format(bid=bid) + ".weight", 1, width))
    out.append((f"{GGUF_MODEL_NAMES['final_norm']}.weight", 1, shape.hidden))
    if not shape.tied_embeddings:
        out.append((f"{GGUF_MODEL_NAMES['lm_head']}.weight", shape.vocab, shape.hidden))
    return out


def weights(shape: ModelShape, dims: list[LayerDims], fmt: Format,
            tensor_types: dict[str, str] | None = None) -> Weights:
    """Bytes of the weights in the format. ``tensor_types``: the target's per-tensor types for the
    model (Target.tensor_types; GGUF needs them, the stored type follows from each row length)."""
    embed = f"{GGUF_MODEL_NAMES['embed']}.weight"
    tensors = matrices(shape, dims)
    target = fmt.spec
    sizes = {name: target.tensor_bytes(name, rows, cols, fmt.name, rows > 1 and name != embed,
                                       tensor_types)
             for name, rows, cols in tensors}
    read = [(name, rows * cols) for name, rows, cols in tensors if rows > 1 and name != embed]
    total, per_token = sum(sizes.values()), sum(sizes[n] for n, _ in read)
    output_params = shape.vocab * shape.hidden
    matmul = sum(n for _, n in read)
    if shape.tied_embeddings:  # the output layer multiplies by the embedding table
        matmul += output_params
        copy = target.tied_output_bytes(shape.vocab, shape.hidden, fmt.name)
        total += copy  # a file that stores its own output matrix reads that, else the table
        per_token += copy or sizes[embed]
    return Weights(total, per_token, matmul, output_params)


def kv_bytes(shape: ModelShape, dims: list[LayerDims], fmt: Format, tokens: int) -> int:
    """Keys and values of every layer for ``tokens`` positions (each layer its own KV heads)."""
    return 2 * sum(d.n_kv for d in dims) * shape.head_dim * tokens * fmt.kv_bytes_per_value


def buffer_bytes(shape: ModelShape, dims: list[LayerDims], fmt: Format, context: int) -> int:
    """Largest transient buffers of a prefill chunk with the context full: attention scores of
    the widest layer (float32), and the chunk's logits (the rows the runtime computes)."""
    scores = max(d.n_head for d in dims) * min(CHUNK, context) * context * 4
    logits = fmt.spec.output_rows(min(CHUNK, context)) * shape.vocab * 4
    return scores + logits


def prefill_flops(shape: ModelShape, dims: list[LayerDims], w: Weights, fmt: Format,
                  tokens: int) -> float:
    """Multiply-adds x 2 of a prompt: the matrices for every token (the output layer for the last
    one only in llama.cpp, for all in ONNX) and causal attention (QK^T and PV)."""
    out_rows = fmt.spec.output_rows(tokens)
    linear = 2 * ((w.matmul_params - w.output_params) * tokens + w.output_params * out_rows)
    attention = 2 * 2 * sum(d.n_head for d in dims) * shape.head_dim * tokens * (tokens + 1) / 2
    return linear + attention


@dataclass(frozen=True)
class Cost:
    weight_bytes: int
    kv_bytes: int  # at the context
    memory_bytes: float  # predicted peak resident set with the context full
    decode_tokens_per_s: float  # after a PROMPT_TOKENS prompt
    prefill_tokens_per_s: float  # on a PROMPT_TOKENS prompt
    ttft_s: float
    context: int
    basis: str  # the calibration's: measured | nominal

    def to_dict(self) -> dict:
        return asdict(self)


def predict(shape: ModelShape, dims: list[LayerDims], fmt: Format, calib: Calibration,
            context: int, tensor_types: dict[str, str] | None = None) -> Cost:
    w = weights(shape, dims, fmt, tensor_types)
    kv = kv_bytes(shape, dims, fmt, context)
    memory = (calib.memory_base + calib.memory_per_weight_byte * w.total + kv
              + buffer_bytes(shape, dims, fmt, context))
    position = PROMPT_TOKENS + GEN_TOKENS // 2  # mean position while decoding
    step = calib.decode_overhead_s + (w.per_token + kv_bytes(shape, dims, fmt, position)) / calib.bandwidth
    flops = prefill_flops(shape, dims, w, fmt, PROMPT_TOKENS)
    prefill = calib.prefill_overhead_s + flops / calib.prefill_flops
    return Cost(w.total, kv, memory, 1 / step, PROMPT_TOKENS / prefill, prefill + step, context,
                calib.basis)


# --- calibration from measurements ---------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One model size run in the runtime: what the cost model needs and what was measured."""

    dims: list[LayerDims]
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_rss_bytes: float  # with the context full
    context: int
    # each figure's interval as a fraction of it (stats.Interval.half_width): decode, prefill,
    # memory; the fit weighs each figure by it. None: all alike
    spread: tuple[float, float, float] | None = None


SPREAD_FLOOR = 0.005  # an interval narrower than this weighs no more than this (one run, a rounding)


def fit(shape: ModelShape, fmt: Format, observations: list[Observation],
        tensor_types: dict[str, str] | None = None) -> Calibration:
    """Least-squares fit of the efficiency terms to runs of a few model sizes:
    decode seconds/token against bytes read, prefill seconds against FLOPs, peak RSS (less the
    analytic KV cache and buffers) against weight bytes; each point weighed by one over the square
    of its interval's half-width (Observation.spread), so a figure measured tightly counts more."""
    if len(observations) < 2:
        raise UserError("calibration needs runs of at least two model sizes")
    dec, pre, mem = [], [], []
    weighs: list[list[float]] = [[], [], []]  # each point's weight, per line fitted
    position = PROMPT_TOKENS + GEN_TOKENS // 2
    for o in observations:
        w = weights(shape, o.dims, fmt, tensor_types)
        dec.append((w.per_token + kv_bytes(shape, o.dims, fmt, position), 1 / o.decode_tokens_per_s))
        pre.append((prefill_flops(shape, o.dims, w, fmt, PROMPT_TOKENS),
                    PROMPT_TOKENS / o.prefill_tokens_per_s))
        mem.append((w.total, o.peak_rss_bytes - kv_bytes(shape, o.dims, fmt, o.context)
                    - buffer_bytes(shape, o.dims, fmt, o.context)))
        for i, rel in enumerate(o.spread or (1.0, 1.0, 1.0)):  # absolute error: rel x the figure
            figure = (dec[-1][1], pre[-1][1], o.peak_rss_bytes)[i]
            weighs[i].append(1 / (max(rel, SPREAD_FLOOR) * figure) ** 2)
    d0, d1 = _line(dec, weighs[0])
    p0, p1 = _line(pre, weighs[1])
    m0, m1 = _line(mem, weighs[2])
    return Calibration(d0, 1 / d1, p0, 1 / p1, m0, m1, "measured")


def _line(points: list[tuple[float, float]], weights: list[float] | None = None) -> tuple[float, float]:
    """Intercept and slope of y = a + b x by weighted least squares, with a >= 0 and b > 0
    (through the origin when the free fit's intercept is negative: a runtime has no negative
    overhead)."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    w = np.sqrt(np.asarray(weights, dtype=np.float64)) if weights is not None else np.ones_like(x)
    w = w / w.max()
    a, b = np.linalg.lstsq(np.stack([w, w * x], 1), w * y, rcond=None)[0]
    if a < 0 or b <= 0:
        a, b = 0.0, float(((w * x) @ (w * y)) / ((w * x) @ (w * x)))
    return float(a), float(b)


@dataclass(frozen=True)
class Pricing:
    """Everything predict() needs but the layer sizes: one model, format, device and context."""

    shape: ModelShape
    fmt: Format
    calibration: Calibration
    context: int
    tensor_types: dict[str, str] | None = None  # the target's per-tensor types (Target.tensor_types)

    def cost(self, dims: list[LayerDims]) -> Cost:
        return predict(self.shape, dims, self.fmt, self.calibration, self.context, self.tensor_types)

    def hint(self, budget: str) -> str:
        """What other than pruning would move a budget's figure."""
        smaller = f"a smaller {self.fmt.spec.noun} than"
        if budget == "max_memory":
            return f"{smaller} {self.fmt.name}, or a shorter --context than {self.context}"
        if budget == "min_tokens_per_s":
            return f"{smaller} {self.fmt.name}, or a device with more memory bandwidth"
        return f"{smaller} {self.fmt.name}, or a device with more compute"


def anchored(pricing: Pricing, dims: list[LayerDims], run: dict) -> Calibration:
    """The pricing's calibration moved so that it predicts the dense model's run in the runtime
    exactly: the memory base by the difference in peak RSS, the effective bandwidth and compute by
    the measured decode and prefill times (overheads kept). For a type `profile detect` did not
    measure, one real run of this model beats efficiencies carried over from another type (llama.cpp
    repacks Q4_0 for AVX2 and holds more than its file) or from a datasheet; the search still
    scales it to smaller plans by bytes and FLOPs."""
    c, fmt, shape = pricing.calibration, pricing.fmt, pricing.shape
    cost = pricing.cost(dims)
    w = weights(shape, dims, fmt, pricing.tensor_types)
    read = w.per_token + kv_bytes(shape, dims, fmt, PROMPT_TOKENS + GEN_TOKENS // 2)
    step = 1 / run["decode"]["tokens_per_s"] - c.decode_overhead_s
    prefill = PROMPT_TOKENS / run["prefill"]["tokens_per_s"] - c.prefill_overhead_s
    return replace(
        c, memory_base=c.memory_base + run["peak_rss_bytes"] - cost.memory_bytes,
        bandwidth=read / step if step > 0 else c.bandwidth,
        prefill_flops=prefill_flops(shape, dims, w, fmt, PROMPT_TOKENS) / prefill if prefill > 0
        else c.prefill_flops,
        basis=f"{c.basis}, anchored at the dense {fmt.name} run")
