"""The plan: what to prune, as data. Applying it is one function (prune.apply.apply_plan).

Per decoder layer a plan records the kept query heads, kept KV heads and kept MLP channels (the
structured part: the layer's new shape) and one unstructured ratio per projection (the fraction
of the kept weights set to zero). It also records the settings and calibration that produced it
and the projection outlier distribution it was allocated from, so it is saved beside every
artifact and reproduces it.

How a plan is made (make_plan), for a global target S (fraction of decoder-layer parameters
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

import torch

from .allocation import MAX_RATIO, allocate, fit_mean
from .allocation import names as allocation_names
from .arch import ATTENTION, MLP, PROJECTIONS, LayerDims, ModelShape
from .errors import UserError
from .prune.structured import choose_channels, choose_heads, head_options

PLAN_FORMAT = "mosaic-export plan"
PLAN_VERSION = 1
METHODS = ("wanda", "sparsegpt")
STRUCTURED_SCORES = ("activation", "magnitude")
MAX_SPARSITY = 0.95


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = "builtin"  # "builtin" (pydoc_data.topics), a .txt file or a .jsonl file
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class PruneSettings:
    sparsity: float = 0.5  # fraction of decoder-layer parameters removed, in [0, 0.95]
    structured_fraction: float = 0.0  # share of it removed physically (heads, channels)
    allocation: str = "projection"
    method: str = "wanda"  # unstructured pruner
    outlier_m: float = 5.0  # POD threshold: outlier when score > M * mean
    lam: float = 0.08  # OWL's lambda: ratios spread over +- lambda around the target
    alignment: int = 1  # kept MLP channels (and head rows) a multiple of this
    compensate: bool = True  # least-squares update of o / down after removing their inputs
    structured_scores: str = "activation"  # how heads and channels are ranked; "magnitude": weights only
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

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
        need(self.outlier_m > 0, f"outlier M must be positive, got {self.outlier_m}")
        need(0.0 <= self.lam < 0.5, f"lambda must be in [0, 0.5), got {self.lam}")
        need(self.alignment >= 1, f"alignment must be a positive integer, got {self.alignment}")
        c = self.calibration
        need(c.n_samples >= 1, f"--calib-samples must be at least 1, got {c.n_samples}")
        need(c.seq_len >= 2, f"--calib-seq-len must be at least 2 tokens, got {c.seq_len}")
        return self


@dataclass
class LayerMeasurement:
    """What pass 1 (dense model, calibration data) learns about one layer."""

    projection_outliers: dict[str, float]  # POD: outlier ratio per projection
    layer_outliers: float  # all projections of the layer together (OWL)
    group_outliers: dict[str, float]  # "attn" (q, k, v, o) and "mlp" (gate, up, down)
    head_scores: dict[str, torch.Tensor]  # per STRUCTURED_SCORES kind: (n_head,) per query head
    channel_scores: dict[str, torch.Tensor]  # per kind: (n_ff,) per MLP channel


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
        """Every layer is a valid GQA layer of this model; ratios in [0, 1)."""
        shape = self.shape
        if len(self.layers) != shape.n_layers:
            raise ValueError(f"expected {shape.n_layers} layers, got {len(self.layers)}")
        r = shape.n_head // shape.n_kv
        for i, lp in enumerate(self.layers):
            if not lp.kv_heads or len(lp.q_heads) % len(lp.kv_heads):
                raise ValueError(f"layer {i}: query heads must split evenly over KV heads")
            per = len(lp.q_heads) // len(lp.kv_heads)
            expected_groups = [h // r for h in lp.q_heads]
            if expected_groups != [g for g in lp.kv_heads for _ in range(per)]:
                raise ValueError(f"layer {i}: query heads {lp.q_heads} do not belong to the kept "
                                 f"KV heads {lp.kv_heads} in order")
            if not lp.channels or max(lp.channels) >= shape.n_ff or min(lp.channels) < 0:
                raise ValueError(f"layer {i}: channels out of range [0, {shape.n_ff})")
            if set(lp.ratios) != set(PROJECTIONS) or not all(0 <= v < 1 for v in lp.ratios.values()):
                raise ValueError(f"layer {i}: expected a ratio in [0, 1) for each of {PROJECTIONS}")


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


def make_plan(shape: ModelShape, source: str, measured: list[LayerMeasurement],
              settings: PruneSettings) -> Plan:
    settings.validate()
    n = shape.n_layers
    pod = {
        "projection": {p: [m.projection_outliers[p] for m in measured] for p in PROJECTIONS},
        "layer": [m.layer_outliers for m in measured],
        "group": {g: [m.group_outliers[g] for m in measured] for g in ("attn", "mlp")},
    }
    dense = shape.dense_dims
    decoder_dense = n * shape.layer_params(dense)
    removed_target = settings.sparsity * decoder_dense

    # 1. Structured part: per-layer head layouts and channel counts.
    if settings.structured_fraction > 0 and settings.sparsity > 0:
        dims = _structured_dims(shape, pod, settings, settings.structured_fraction * removed_target)
    else:
        dims = [dense] * n
    layers = []
    for m, d in zip(measured, dims, strict=True):
        if d.n_head == shape.n_head:
            heads_q, heads_kv = list(range(shape.n_head)), list(range(shape.n_kv))
        else:
            heads = choose_heads(m.head_scores[settings.structured_scores], shape.n_kv, d.n_kv,
                                 d.n_head // d.n_kv)
            heads_q, heads_kv = heads.q_heads, heads.kv_heads
        channels = (list(range(shape.n_ff)) if d.n_ff == shape.n_ff
                    else choose_channels(m.channel_scores[settings.structured_scores], d.n_ff))
        layers.append(LayerPlan(heads_q, heads_kv, channels, {p: 0.0 for p in PROJECTIONS}))

    # 2. Unstructured part: what is left of the target, as zeros in the kept weights.
    removed_structured = decoder_dense - sum(shape.layer_params(lp.dims) for lp in layers)
    removed_left = removed_target - removed_structured
    weights = {p: torch.tensor([float(_weight_count(shape, lp.dims, p)) for lp in layers],
                               dtype=torch.float64) for p in PROJECTIONS}
    kept_weights = float(sum(w.sum() for w in weights.values()))
    ratio_u = removed_left / kept_weights
    if ratio_u > 1e-9:
        if ratio_u > MAX_RATIO:
            raise UserError(f"sparsity {settings.sparsity} cannot be reached: the unstructured part "
                            f"would need {ratio_u:.1%} of the kept weights")
        ratios = allocate(settings.allocation, ratio_u, settings.lam,
                          {p: torch.tensor(pod["projection"][p]) for p in PROJECTIONS},
                          torch.tensor(pod["layer"]), weights)
        for i, lp in enumerate(layers):
            lp.ratios = {p: float(ratios[p][i]) for p in PROJECTIONS}
    plan = Plan(model={"source": source, "shape": shape.to_dict()}, settings=settings, pod=pod,
                layers=layers)
    plan.check()
    return plan


def _weight_count(shape: ModelShape, dims: LayerDims, name: str) -> int:
    out, inp = shape.projection_shape(name, dims)
    return out * inp


def _group_params(shape: ModelShape, dims: LayerDims, group: tuple[str, ...]) -> int:
    return sum(shape.projection_params(p, dims) for p in group)


def _structured_dims(shape: ModelShape, pod: dict, settings: PruneSettings,
                     removed_target: float) -> list[LayerDims]:
    n, dense, align = shape.n_layers, shape.dense_dims, settings.alignment
    attn_dense, mlp_dense = _group_params(shape, dense, ATTENTION), _group_params(shape, dense, MLP)
    ratio = removed_target / (n * (attn_dense + mlp_dense))
    if ratio > MAX_RATIO:
        raise UserError(f"cannot remove {removed_target:.0f} parameters by structure: that is "
                        f"{ratio:.0%} of all projections")
    group_ratios = allocate(
        settings.allocation, ratio, settings.lam,
        {g: torch.tensor(pod["group"][g]) for g in ("attn", "mlp")}, torch.tensor(pod["layer"]),
        {"attn": torch.full((n,), float(attn_dense)), "mlp": torch.full((n,), float(mlp_dense))})

    # Attention: the valid GQA layout nearest to each layer's ratio (ties: keep more).
    aligned_dense = (shape.n_head * shape.head_dim) % align == 0
    options = [(g, q) for g, q in head_options(shape.n_head, shape.n_kv)
               if not aligned_dense or (g * q * shape.head_dim) % align == 0]
    attn_dims = []
    for i in range(n):
        want = (1 - float(group_ratios["attn"][i])) * attn_dense
        g, q = min(options, key=lambda o: (
            abs(_group_params(shape, LayerDims(o[0] * o[1], o[0], dense.n_ff), ATTENTION) - want),
            -o[0] * o[1], -o[0]))
        attn_dims.append((g * q, g))
    attn_removed = sum(attn_dense - _group_params(shape, LayerDims(h, kv, dense.n_ff), ATTENTION)
                       for h, kv in attn_dims)

    # MLP: shift the allocated channel ratios together so the total lands on the target.
    mlp_removed_target = max(0.0, removed_target - attn_removed)
    mlp_ratio = mlp_removed_target / (n * mlp_dense)
    max_mlp_ratio = 1 - align / shape.n_ff
    if mlp_ratio > max_mlp_ratio:
        raise UserError(f"cannot remove {removed_target:.0f} parameters by structure with channel "
                        f"alignment {align}")
    mlp_ratios = fit_mean(group_ratios["mlp"], torch.ones(n), mlp_ratio, hi=max_mlp_ratio)
    units = [(1 - float(r)) * shape.n_ff / align for r in mlp_ratios]  # kept, in aligned blocks
    kept_units = _round_preserving_sum(units, lo=1, hi=shape.n_ff // align)
    return [LayerDims(h, kv, u * align) for (h, kv), u in zip(attn_dims, kept_units, strict=True)]


def _round_preserving_sum(values: list[float], lo: int, hi: int) -> list[int]:
    """Integers within [lo, hi], each the floor or ceiling of its value, summing to round(sum)
    where the bounds allow (largest remainders round up)."""
    floors = [min(hi, max(lo, int(v))) for v in values]
    short = int(round(sum(values))) - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - int(values[i])), i))
    for i in order:
        if short <= 0:
            break
        if floors[i] < hi:
            floors[i] += 1
            short -= 1
    return floors
