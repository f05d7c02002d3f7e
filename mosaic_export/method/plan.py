"""The plan: what to prune, as data. Applying it is one function (prune.apply.apply_plan).

Per decoder layer a plan records the kept query heads, kept KV heads and kept MLP channels (the
structured part: the layer's new shape) and one unstructured ratio per projection (the fraction
of the kept weights set to zero). It also records the settings and calibration that produced it
and the projection outlier distribution it was allocated from, so it is saved beside every
artifact and reproduces it.

How a plan is made (planner.make_plan, from the pass-1 measurements of pod.measure), for a global
target S (fraction of decoder-layer parameters
removed) and a structured fraction F:
1. Structured: F*S of the decoder parameters go by removing heads and channels. The allocation
   rule spreads that over layers and over the attention / MLP groups (POD of each group); the
   per-layer attention ratio is met by the nearest valid GQA head layout, and the MLP channel
   counts are then shifted together so the total lands on the target (channels are fine-grained,
   heads are not). Which heads and channels go is decided by their activation-aware scores.
2. Unstructured: the rest of S is removed as zeros inside the kept matrices, allocated per
   projection (uniform / layer / projection rule) with the parameter counts as weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.method.allocation import NEEDS_ERRORS
from mosaic_export.method.allocation import names as allocation_names
from mosaic_export.model.arch import LayerDims, ModelShape
from mosaic_export.model.names import ATTENTION, MLP, PROJECTIONS

PLAN_FORMAT = "mosaic-export plan"
PLAN_VERSION = 1
METHODS = ("wanda", "sparsegpt")
STRUCTURED_SCORES = ("activation", "magnitude")
STATE_DTYPES = ("float32", "bfloat16", "float16")  # calibration hidden states between layers
STRUCTURES = ("width", "blocks")  # heads and channels; whole attention blocks and layers
MAX_SPARSITY = 0.95


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = "builtin"  # "builtin" (pydoc_data.topics), a .txt file or a .jsonl file
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    states: str = "float32"  # the dtype the hidden states are kept in between layers (STATE_DTYPES)


@dataclass(frozen=True)
class PruneSettings:
    sparsity: float = 0.5  # fraction of decoder-layer parameters removed, in [0, 0.95]
    structured_fraction: float = 0.0  # share of it removed physically (heads, channels)
    allocation: str = "projection"
    method: str = "wanda"  # unstructured pruner
    outlier_m: float = 5.0  # POD threshold: outlier when score > M * mean
    lam: float = 0.08  # OWL's lambda: ratios spread over +- lambda around the target
    alignment: int = 1  # kept MLP channels (and head rows) a multiple of this
    keep_kv_heads: bool = False  # every layer keeps its KV heads (ONNX Runtime GenAI needs one count)
    compensate: bool = True  # least-squares update of o / down after removing their inputs
    structured_scores: str = "activation"  # how heads and channels are ranked; "magnitude": weights only
    structure: str = "width"  # what the structured part removes: heads and channels, or whole blocks
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    @property
    def measures_errors(self) -> bool:
        """Whether the allocation reads errors measured in pass 1 (see error_kinds)."""
        return self.allocation in NEEDS_ERRORS

    def error_kinds(self, searched: bool = False) -> frozenset[str]:
        """The errors pass 1 must measure (pod.measure): "projection", each projection's at every
        ladder ratio, for a plan with an unstructured part; "structure", each layer's at every head
        layout and MLP width, for a structured plan (a budget search or a sweep removes structure:
        ``searched``)."""
        if not self.measures_errors:
            return frozenset()
        kinds = set()
        if not searched and self.structured_fraction < 1:
            kinds.add("projection")
        if (searched or self.structured_fraction > 0) and self.structure == "width":
            kinds.add("structure")
        return frozenset(kinds)

    def validate(self) -> PruneSettings:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(0.0 <= self.sparsity <= MAX_SPARSITY,
             f"sparsity must be in [0, {MAX_SPARSITY}], got {self.sparsity}")
        need(0.0 <= self.structured_fraction <= 1.0,
             f"structured fraction must be in [0, 1], got {self.structured_fraction}")
        need(self.allocation in allocation_names(),
             f"allocation must be one of {', '.join(allocation_names())}, got '{self.allocation}'")
        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, "
             f"got '{self.method}'")
        need(self.structured_scores in STRUCTURED_SCORES,
             f"structured scores must be one of {', '.join(STRUCTURED_SCORES)}, "
             f"got '{self.structured_scores}'")
        need(not (self.measures_errors and 0 < self.structured_fraction < 1 and self.sparsity > 0),
             f"allocation '{self.allocation}' measures its errors on the dense model: it allocates "
             "all-unstructured or all-structured plans (--structured-fraction 0 or 1)")
        need(not (self.measures_errors and self.structured_scores != "activation"),
             f"allocation '{self.allocation}' measures heads and channels as the activation scores "
             "rank them: it cannot go with --structured-scores magnitude")
        need(not (self.measures_errors and self.structure == "blocks"),
             f"allocation '{self.allocation}' chooses heads and channels; whole blocks are chosen by "
             "the energy they write (--structure blocks): use another allocation")
        need(self.structure in STRUCTURES, f"structure must be one of {', '.join(STRUCTURES)}, "
             f"got '{self.structure}'")
        need(self.outlier_m > 0, f"outlier M must be positive, got {self.outlier_m}")
        need(0.0 <= self.lam < 0.5, f"lambda must be in [0, 0.5), got {self.lam}")
        need(self.alignment >= 1, f"alignment must be a positive integer, got {self.alignment}")
        c = self.calibration
        need(c.n_samples >= 1, f"--calib-samples must be at least 1, got {c.n_samples}")
        need(c.seq_len >= 2, f"--calib-seq-len must be at least 2 tokens, got {c.seq_len}")
        need(c.states in STATE_DTYPES, f"--calib-states must be one of {', '.join(STATE_DTYPES)}, "
             f"got '{c.states}'")
        return self


@dataclass
class LayerPlan:
    q_heads: list[int]  # kept query heads (original indices), grouped by KV head
    kv_heads: list[int]  # kept KV heads
    channels: list[int]  # kept MLP channels
    ratios: dict[str, float]  # unstructured ratio per projection, of its kept weights

    @property
    def dims(self) -> LayerDims:
        return LayerDims(len(self.q_heads), len(self.kv_heads), len(self.channels))


@dataclass
class Plan:
    model: dict  # {"source": str, "shape": ModelShape as dict}
    settings: PruneSettings
    pod: dict  # {"projection": {p: [n_layers]}, "layer": [..], "group": {"attn": .., "mlp": ..}}
    layers: list[LayerPlan]
    version: int = PLAN_VERSION

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**self.model["shape"])

    def params(self) -> dict[str, int]:
        """Parameter counts: decoder layers dense / after resize / expected non-zero; whole model."""
        shape = self.shape
        dense = shape.n_layers * shape.layer_params(shape.dense_dims)
        resized = sum(shape.layer_params(lp.dims) for lp in self.layers)
        zeros = sum(expected_zeros(shape, lp.dims, p, lp.ratios[p])
                    for lp in self.layers for p in PROJECTIONS)
        outside = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2) + shape.hidden
        return {
            "decoder_dense": dense, "decoder_resized": resized,
            "decoder_nonzero": resized - zeros, "outside_decoder": outside,
            "total_dense": dense + outside, "total_resized": resized + outside,
        }

    def removed(self) -> float:
        """The share of decoder parameters removed by structure (0 for a dense plan)."""
        p = self.params()
        return 1 - p["decoder_resized"] / p["decoder_dense"]

    def is_structured(self) -> bool:
        return any(lp.dims != self.shape.dense_dims for lp in self.layers)

    # --- serialisation ---------------------------------------------------------------------------

    def to_json(self) -> str:
        data = {"format": PLAN_FORMAT, "version": self.version, "model": self.model,
                "settings": asdict(self.settings), "pod": self.pod,
                "layers": [asdict(lp) for lp in self.layers], "params": self.params()}
        return compact_json(data)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read plan {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise UserError(f"{path}: not a mosaic-export plan")
        if data.get("version") != PLAN_VERSION:
            raise UserError(f"{path}: plan version {data.get('version')} is not supported "
                            f"(expected {PLAN_VERSION})")
        try:
            s = dict(data["settings"])
            s["calibration"] = CalibrationSettings(**s["calibration"])
            plan = cls(model=data["model"], settings=PruneSettings(**s).validate(),
                       pod=data["pod"], layers=[LayerPlan(**lp) for lp in data["layers"]])
            plan.check()
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: malformed plan: {e}") from None
        return plan

    def check(self) -> None:
        """Every layer is a valid GQA layer of this model (or a removed block); ratios in [0, 1)."""
        shape = self.shape
        if len(self.layers) != shape.n_layers:
            raise ValueError(f"expected {shape.n_layers} layers, got {len(self.layers)}")
        for i, lp in enumerate(self.layers):
            _check_layer(shape, i, lp, last=i == len(self.layers) - 1)


def _check_layer(shape: ModelShape, i: int, lp: LayerPlan, last: bool) -> None:
    if set(lp.ratios) != set(PROJECTIONS) or not all(0 <= v < 1 for v in lp.ratios.values()):
        raise ValueError(f"layer {i}: expected a ratio in [0, 1) for each of {PROJECTIONS}")
    if lp.channels and (max(lp.channels) >= shape.n_ff or min(lp.channels) < 0):
        raise ValueError(f"layer {i}: channels out of range [0, {shape.n_ff})")
    if bool(lp.q_heads) != bool(lp.kv_heads):
        raise ValueError(f"layer {i}: query heads and KV heads go together")
    if not lp.q_heads:  # a removed attention block (blocks.py)
        if i == 0 or (last and not lp.channels):
            raise ValueError(f"layer {i}: layer 0 keeps its attention and the last layer its MLP "
                             "(transformers' cache, llama.cpp's output rows)")
        if any(lp.ratios[p] for p in ATTENTION + (() if lp.channels else MLP)):
            raise ValueError(f"layer {i}: a removed block has pruning ratios")
        return
    if not lp.channels:
        raise ValueError(f"layer {i}: a layer without its MLP keeps no attention either")
    r = shape.n_head // shape.n_kv
    if len(lp.q_heads) % len(lp.kv_heads):
        raise ValueError(f"layer {i}: query heads must split evenly over KV heads")
    per = len(lp.q_heads) // len(lp.kv_heads)
    if [h // r for h in lp.q_heads] != [g for g in lp.kv_heads for _ in range(per)]:
        raise ValueError(f"layer {i}: query heads {lp.q_heads} do not belong to the kept "
                         f"KV heads {lp.kv_heads} in order")


def compact_json(data) -> str:
    """Indented JSON with lists of numbers kept on one line (plans list every kept channel)."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[[-0-9.,eE\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "),
                  text)


def expected_zeros(shape: ModelShape, dims: LayerDims, name: str, ratio: float) -> int:
    """Zeros the unstructured pruners leave in one projection (both remove round(r*in) per row,
    Wanda per row, SparseGPT per block of rows x 128 columns; counted here per row)."""
    out, inp = shape.projection_shape(name, dims)
    return out * int(round(ratio * inp))


# --- making a plan -------------------------------------------------------------------------------


def weight_count(shape: ModelShape, dims: LayerDims, name: str) -> int:
    out, inp = shape.projection_shape(name, dims)
    return out * inp


