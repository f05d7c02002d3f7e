"""The one table of names: our projections, their Hugging Face module paths and GGUF names.

A *projection* is one linear map of a decoder layer: q, k, v, o (attention) and gate, up, down
(MLP). Every other module looks names up here, never spells them itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UserError

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

# Which projections read the same input (so share one set of calibration statistics):
# q, k, v read the normed hidden state; gate, up read the normed hidden state after attention.
INPUT_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
INPUT_GROUP_OF = {p: g for g, members in INPUT_GROUPS.items() for p in members}

# GGUF tensor names (llama.cpp gguf-py constants): projections and the two norms of a block.
GGUF_NAMES = {
    "q": "blk.{bid}.attn_q", "k": "blk.{bid}.attn_k", "v": "blk.{bid}.attn_v",
    "o": "blk.{bid}.attn_output", "gate": "blk.{bid}.ffn_gate", "up": "blk.{bid}.ffn_up",
    "down": "blk.{bid}.ffn_down", "attn_norm": "blk.{bid}.attn_norm", "ffn_norm": "blk.{bid}.ffn_norm",
}
GGUF_MODEL_NAMES = {"embed": "token_embd", "final_norm": "output_norm", "lm_head": "output"}


@dataclass(frozen=True)
class ArchSpec:
    """Where one Hugging Face architecture keeps the parts the method touches."""

    model_types: tuple[str, ...]  # config.model_type values
    layers: str  # path of the ModuleList of decoder layers from the CausalLM
    attention: str  # path of the attention module within a layer
    mlp: str  # path of the MLP module within a layer
    projections: dict[str, str]  # our name -> path within a layer
    norms: dict[str, str]  # "attn_norm" / "ffn_norm" -> path within a layer
    final_norm: str  # path of the last norm from the CausalLM

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def projection(self, layer: nn.Module, name: str) -> nn.Linear:
        return layer.get_submodule(self.projections[name])

    def set_projection(self, layer: nn.Module, name: str, linear: nn.Linear) -> None:
        parent, _, attr = self.projections[name].rpartition(".")
        setattr(layer.get_submodule(parent), attr, linear)


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

# Llama-family decoders: q/k/v/o attention with grouped-query heads and a gated (SwiGLU) MLP.
# Qwen2 adds q/k/v biases and Qwen3 per-head q/k norms: both survive head removal unchanged.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(model_types=("llama",), **_LLAMA_LIKE),
    "mistral": ArchSpec(model_types=("mistral",), **_LLAMA_LIKE),
    "qwen2": ArchSpec(model_types=("qwen2",), **_LLAMA_LIKE),
    "qwen3": ArchSpec(model_types=("qwen3",), **_LLAMA_LIKE),
}


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES.values() for t in spec.model_types)


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            return spec
    raise UserError(f"architecture '{model_type}' is not supported; supported: "
                    f"{', '.join(supported_model_types())}")


@dataclass(frozen=True)
class LayerDims:
    """The sizes that structured pruning changes, for one decoder layer."""

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
        return self.other_layer_params + sum(self.projection_params(p, dims) for p in PROJECTIONS)

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
