"""The one table of names: our projections and norms, and their GGUF tensor names (llama.cpp's,
from gguf-py). No torch here: the runtime children (targets' runners) import it too.

A *projection* is one linear map of a decoder layer: q, k, v, o (attention) and gate, up, down
(MLP). Every other module looks names up here (or in arch.py, for Hugging Face module paths),
never spells them itself.
"""

from __future__ import annotations

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

# Which projections read the same input (so share one set of calibration statistics):
# q, k, v read the normed hidden state; gate, up read the normed hidden state after attention.
INPUT_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
INPUT_GROUP_OF = {p: g for g, members in INPUT_GROUPS.items() for p in members}

# Our names of a layer's norms, by where they sit: before attention, on the attention output
# (Gemma), before the MLP, on the MLP output (Gemma); and the per-head q / k norms (Qwen3, Gemma 3).
NORM_ROLES = ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm", "q_norm", "k_norm")

# Our names -> gguf-py's tensor kinds (llama.cpp's names come from gguf.TENSOR_NAMES).
GGUF_TENSORS = {
    "q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT", "gate": "FFN_GATE", "up": "FFN_UP",
    "down": "FFN_DOWN", "attn_norm": "ATTN_NORM", "attn_post_norm": "ATTN_POST_NORM",
    "ffn_norm": "FFN_NORM", "ffn_post_norm": "FFN_POST_NORM", "q_norm": "ATTN_Q_NORM",
    "k_norm": "ATTN_K_NORM", "embed": "TOKEN_EMBD", "final_norm": "OUTPUT_NORM", "lm_head": "OUTPUT",
}


# Which norm sits before each block: a removed block (blocks.py) takes its norm with it.
BLOCK_NORM = {"attention": "attn_norm", "mlp": "ffn_norm"}


def _gguf_name(role: str) -> str:
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[GGUF_TENSORS[role]]]


GGUF_NAMES = {role: _gguf_name(role) for role in (*PROJECTIONS, *NORM_ROLES)}
GGUF_MODEL_NAMES = {role: _gguf_name(role) for role in ("embed", "final_norm", "lm_head")}
