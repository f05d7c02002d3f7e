"""Architectures: where each Hugging Face model keeps its projections and norms (ArchSpec), the
model's shape, and per-layer sizes. Names of projections, norms and GGUF tensors: names.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mosaic_export.core.errors import UserError
from mosaic_export.model.fused import UNFUSED_AS
from mosaic_export.model.names import (
    ATTENTION,
    BLOCK_NORM,
    MLP,
    PROJECTIONS,
)


class Absent(nn.Module):
    """A removed block (a layer's whole attention or MLP): adds nothing to the residual stream,
    has no weights and, for attention, no KV cache. Called as the block it replaces."""

    def __init__(self, block: str):
        super().__init__()
        self.block = block

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        zeros = torch.zeros_like(x)
        return (zeros, None) if self.block == "attention" else zeros

    def extra_repr(self) -> str:
        return f"removed {self.block}"




@dataclass(frozen=True)
class ArchSpec:
    """Where one Hugging Face architecture keeps the parts the method touches, and what its
    exporters must compute beyond a Llama block. Sizes and numbers (rope bases, windows, scales)
    are read from the model's config (see the functions below); this holds what the config does
    not say."""

    model_types: tuple[str, ...]  # config.model_type values
    layers: str  # path of the ModuleList of decoder layers from the CausalLM
    attention: str  # path of the attention module within a layer
    mlp: str  # path of the MLP module within a layer
    projections: dict[str, str]  # our name -> path within a layer
    norms: dict[str, str]  # role (NORM_ROLES) -> path within a layer
    final_norm: str  # path of the last norm from the CausalLM
    gguf_arch: str  # gguf-py's architecture (gguf.MODEL_ARCH) for layers of one size
    gguf_per_layer: str | None = None  # the one llama.cpp builds layers of different sizes in
    activation: str = "silu"  # the gated MLP's: "silu" or "gelu_tanh"
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (offset + weight)
    embed_scale: bool = False  # Gemma multiplies the embeddings by sqrt(hidden)
    gguf_names: tuple[str, ...] = ()  # general.architecture values a GGUF input may carry

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def projection(self, layer: nn.Module, name: str) -> nn.Linear:
        return layer.get_submodule(self.projections[name])

    def absent(self, layer: nn.Module, block: str) -> bool:
        """Whether the layer's "attention" or "mlp" block has been removed (Absent)."""
        return isinstance(layer.get_submodule(self.attention if block == "attention" else self.mlp), Absent)

    def present(self, layer: nn.Module) -> tuple[str, ...]:
        """The projections the layer still has (all but those of removed blocks)."""
        gone = ((ATTENTION if self.absent(layer, "attention") else ())
                + (MLP if self.absent(layer, "mlp") else ()))
        return tuple(p for p in PROJECTIONS if p not in gone)

    def remove_block(self, layer: nn.Module, block: str) -> None:
        """Replace the layer's attention or MLP, and the norm before it, by nothing."""
        setattr(layer, self.attention if block == "attention" else self.mlp, Absent(block))
        setattr(layer, self.norms[BLOCK_NORM[block]], nn.Identity())

    def supports_blocks(self) -> bool:
        """Whole blocks can go where each block has exactly one norm before it, at the top level
        of the layer (Llama-like layers; not Gemma's four norms or q / k norms)."""
        return set(self.norms) == set(BLOCK_NORM.values()) and "." not in self.attention + self.mlp

    def set_projection(self, layer: nn.Module, name: str, linear: nn.Linear) -> None:
        parent, _, attr = self.projections[name].rpartition(".")
        setattr(layer.get_submodule(parent), attr, linear)

    def layer_dims(self, layer: nn.Module, head_dim: int) -> LayerDims:
        """A layer's current sizes, read from its projections (0 for a removed block)."""
        attn = not self.absent(layer, "attention")
        return LayerDims(self.projection(layer, "q").out_features // head_dim if attn else 0,
                         self.projection(layer, "k").out_features // head_dim if attn else 0,
                         self.projection(layer, "gate").out_features if not self.absent(layer, "mlp") else 0)

    def norm_weight(self, module: nn.Module) -> torch.Tensor:
        """The scale a norm applies, offset included."""
        return module.weight + self.norm_offset if self.norm_offset else module.weight


_LLAMA_LIKE = dict(
    layers="model.layers",
    attention="self_attn",
    mlp="mlp",
    projections={
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    norms={"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    final_norm="model.norm",
)
_QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}

# Decoders with q/k/v/o attention (grouped-query heads) and a gated MLP. Qwen2 adds q/k/v biases,
# Qwen3 per-head q/k norms, Gemma 3 four norms a layer, q/k norms, GELU, scaled embeddings and
# sliding-window layers: all of them survive head and channel removal unchanged.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(model_types=("llama",), gguf_arch="LLAMA", gguf_per_layer="DECI",
                      **_LLAMA_LIKE),
    "mistral": ArchSpec(model_types=("mistral",), gguf_arch="LLAMA", gguf_per_layer="DECI",
                        **_LLAMA_LIKE),
    # always deci: llama.cpp's qwen2 assumes n_head * head_dim == hidden (no removed heads); deci
    # reads any sizes and the q/k/v biases
    "qwen2": ArchSpec(model_types=("qwen2",), gguf_arch="DECI", gguf_per_layer="DECI",
                      **_LLAMA_LIKE),
    "qwen3": ArchSpec(model_types=("qwen3",), gguf_arch="QWEN3",
                      **{**_LLAMA_LIKE, "norms": {**_LLAMA_LIKE["norms"], **_QK_NORMS}}),
    "gemma3": ArchSpec(
        model_types=("gemma3_text",), gguf_names=("gemma3",), gguf_arch="GEMMA3",
        activation="gelu_tanh", norm_offset=1.0, embed_scale=True,
        **{**_LLAMA_LIKE, "norms": {"attn_norm": "input_layernorm",
                                    "attn_post_norm": "post_attention_layernorm",
                                    "ffn_norm": "pre_feedforward_layernorm",
                                    "ffn_post_norm": "post_feedforward_layernorm", **_QK_NORMS}}),
}


def supported_model_types() -> list[str]:
    return sorted([*(t for spec in ARCHITECTURES.values() for t in spec.model_types), *UNFUSED_AS])


def arch_for(model_type: str) -> ArchSpec:
    """The spec of a config's model_type, or of a GGUF file's general.architecture (a fused
    architecture: the spec of what it is rewritten as on load, fused.py)."""
    model_type = UNFUSED_AS.get(model_type, model_type)
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types or model_type in spec.gguf_names:
            return spec
    raise UserError(f"architecture '{model_type}' is not supported; supported: "
                    f"{', '.join(supported_model_types())}")


@dataclass(frozen=True)
class LayerDims:
    """The sizes that structured pruning changes, for one decoder layer. n_head = n_kv = 0: the
    attention block is removed; n_ff = 0 too: the whole layer (blocks.py)."""

    n_head: int
    n_kv: int
    n_ff: int


@dataclass(frozen=True)
class ModelShape:
    """The dense model's sizes, read from its config; head_dim and hidden never change."""

    model_type: str
    n_layers: int
    hidden: int
    head_dim: int
    n_head: int
    n_kv: int
    n_ff: int
    vocab: int
    tied_embeddings: bool
    bias: dict[str, bool]  # projection -> has a bias
    other_layer_params: int  # per layer, params outside the projections (norms)

    @property
    def dense_dims(self) -> LayerDims:
        return LayerDims(self.n_head, self.n_kv, self.n_ff)

    def projection_shape(self, name: str, dims: LayerDims) -> tuple[int, int]:
        """(out, in) of a projection's weight at the given layer sizes."""
        q, kv, h = dims.n_head * self.head_dim, dims.n_kv * self.head_dim, self.hidden
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
                "gate": (dims.n_ff, h), "up": (dims.n_ff, h), "down": (h, dims.n_ff)}[name]

    def projection_params(self, name: str, dims: LayerDims) -> int:
        out, inp = self.projection_shape(name, dims)
        return out * inp + (out if self.bias[name] else 0)

    def layer_params(self, dims: LayerDims) -> int:
        """Parameters of a layer at these sizes; a removed block takes its norm (one vector of
        hidden: blocks are removed only where that is the layout, ArchSpec.supports_blocks)."""
        gone_norms = self.hidden * ((dims.n_head == 0) + (dims.n_ff == 0))
        projections = sum(self.projection_params(p, dims) for p in PROJECTIONS)
        return self.other_layer_params - gone_norms + projections

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_shape(model: nn.Module, spec: ArchSpec) -> ModelShape:
    """Read the dense sizes from a loaded Hugging Face model (its layer 0 must be dense)."""
    cfg = model.config
    layer = spec.layer_list(model)[0]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    bias = {p: spec.projection(layer, p).bias is not None for p in PROJECTIONS}
    proj = sum(p.numel() for name in PROJECTIONS for p in spec.projection(layer, name).parameters())
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    return ModelShape(
        model_type=cfg.model_type, n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        head_dim=head_dim, n_head=cfg.num_attention_heads, n_kv=n_kv,
        n_ff=cfg.intermediate_size, vocab=emb.weight.shape[0],
        tied_embeddings=out is not None and out.weight is emb.weight,
        bias=bias, other_layer_params=sum(p.numel() for p in layer.parameters()) - proj,
    )


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding attention window (None: the layer sees every earlier position), as
    transformers applies it: ``layer_types`` where the config has them (Gemma 3, Qwen), else the
    one ``sliding_window`` for every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * config.num_hidden_layers


def rope_base(config, window: int | None) -> float:
    """The rotary base of a layer: Gemma 3's sliding layers use their own local base."""
    local = getattr(config, "rope_local_base_freq", None)
    return float(local if window is not None and local is not None else config.rope_theta)


def attention_scale(config, head_dim: int) -> float:
    """What scores are multiplied by: 1/sqrt(head_dim), or Gemma's 1/sqrt(query_pre_attn_scalar)."""
    return float(getattr(config, "query_pre_attn_scalar", None) or head_dim) ** -0.5


# config.hidden_act / hidden_activation -> ArchSpec.activation
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def unsupported_features(config, spec: ArchSpec) -> list[str]:
    """What neither exporter computes, named for an error message."""
    found = []
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if ACTIVATIONS.get(act) != spec.activation:
        found.append(f"activation {act}")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        found.append(f"partial rotary embeddings ({config.partial_rotary_factor})")
    if getattr(config, "use_bidirectional_attention", False):
        found.append("bidirectional attention")
    if getattr(config, "rope_scaling", None):
        found.append(f"rope scaling {config.rope_scaling}")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None):
            found.append(f"{key} {getattr(config, key)}")
    return found
