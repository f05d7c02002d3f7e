"""Fused projections, split on load: Phi-3 becomes the Mistral model it computes.

Phi-3 keeps q, k and v in one ``qkv_proj`` (rows: the query heads, then the KV heads of k, then
those of v) and gate and up in one ``gate_up_proj`` (rows: gate, then up); apart from that its
block is Mistral's: RMSNorm, rotary halves, grouped-query attention with one sliding window for
every layer, SiLU-gated MLP. Split into separate Linears, every projection has its own outliers,
ratio and kept heads and channels like any other model's, and the rest of the tool never sees a
fused projection. The pruned checkpoint is then a ``mistral`` one (config.json says so).
"""

from __future__ import annotations

import torch
from torch import nn

from mosaic_export.core.errors import UserError

# model_type -> the architecture its model is rewritten as on load
UNFUSED_AS = {"phi3": "mistral"}


def _mistral_config(cfg):
    from transformers import MistralConfig

    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"phi3 with partial rotary embeddings ({cfg.partial_rotary_factor}) is not "
                        "supported")
    if getattr(cfg, "rope_scaling", None):
        raise UserError(f"phi3 with rope scaling {cfg.rope_scaling} is not supported")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads, head_dim=head_dim,
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, sliding_window=cfg.sliding_window,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


def split_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Phi-3's weights under Mistral's names: qkv_proj and gate_up_proj cut by rows."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q = cfg.num_attention_heads * head_dim
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name[: -len("qkv_proj.weight")]
            for part, rows in zip(("q", "k", "v"), t.split([q, kv, kv]), strict=True):
                out[f"{stem}{part}_proj.weight"] = rows
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name[: -len("gate_up_proj.weight")]
            gate, up = t.chunk(2, dim=0)
            out[f"{stem}gate_proj.weight"], out[f"{stem}up_proj.weight"] = gate, up
        else:
            out[name] = t
    return out


def unfuse(model: nn.Module) -> nn.Module:
    """The model itself, or for Phi-3 the MistralForCausalLM with the same weights, split."""
    from transformers import MistralForCausalLM
    from transformers.modeling_utils import no_init_weights

    cfg = model.config
    if cfg.model_type not in UNFUSED_AS:
        return model
    with no_init_weights():
        new = MistralForCausalLM(_mistral_config(cfg))
    new.load_state_dict(split_state(model.state_dict(), cfg), strict=True)
    if cfg.tie_word_embeddings:
        new.tie_weights()
    new.generation_config = model.generation_config
    return new.eval()
