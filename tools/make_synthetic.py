"""A random-weight Llama-architecture checkpoint of a given shape, for measuring time and memory on
models bigger than any this machine can download (issue 15). Its quality means nothing.

    python tools/make_synthetic.py --preset llama-3.1-8b --out /tmp/synth-8b            # ~16 GB
    python tools/make_synthetic.py --preset llama-3.1-8b --layers 16 --out /tmp/synth-8b-16
    python tools/make_synthetic.py --hidden 256 --layers 4 --heads 8 --kv-heads 2 \\
        --intermediate 704 --vocab 49152 --out /tmp/synth-small

The folder is an ordinary Hugging Face one: config.json, safetensors shards in the stored dtype
(bf16 by default) with model.safetensors.index.json, and a tokenizer (the built-in model's,
SmolLM2's 49,152 tokens, unless --tokenizer names another model; the vocabulary must be at least
the tokenizer's, which is padded with tokens <synthetic_N> to exactly --vocab: llama.cpp sizes
the embedding by the tokens it reads). Deterministic: each tensor is drawn from its own
generator, seeded from --seed and the tensor's name, so the same arguments write the same bytes.
Linear weights are normal with std 0.02 (o and down scaled by 1 / sqrt(2 * layers), as GPT-2
does, to keep the residual stream bounded); norms are ones. Tensors are made and written one
shard at a time: memory is about one shard (--shard-size) and the largest tensor drawn in
float32 (peak RSS 5.4 GB for the 8B shape: 2 GiB shards, a 128,256 x 4,096 embedding; 1 min 3 s
for its 4-layer cut here). The folder is written beside
--out and moved into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

PRESETS = {
    # meta-llama/Llama-3.1-8B's config.json
    "llama-3.1-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                         rope_theta=500000.0, tie=False),
    # HuggingFaceTB/SmolLM2-135M's
    "smollm2-135m": dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                         rope_theta=100000.0, tie=True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_size(text: str) -> int:
    from mosaic_export.core.errors import UserError
    from mosaic_export.core.units import parse_bytes

    try:
        return parse_bytes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tensor_shapes(a: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in the order transformers' Llama names them."""
    hd = a.hidden // a.heads
    out = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (a.hidden,)),
                (p + "self_attn.q_proj.weight", (a.heads * hd, a.hidden)),
                (p + "self_attn.k_proj.weight", (a.kv_heads * hd, a.hidden)),
                (p + "self_attn.v_proj.weight", (a.kv_heads * hd, a.hidden)),
                (p + "self_attn.o_proj.weight", (a.hidden, a.heads * hd)),
                (p + "post_attention_layernorm.weight", (a.hidden,)),
                (p + "mlp.gate_proj.weight", (a.intermediate, a.hidden)),
                (p + "mlp.up_proj.weight", (a.intermediate, a.hidden)),
                (p + "mlp.down_proj.weight", (a.hidden, a.intermediate))]
    out.append(("model.norm.weight", (a.hidden,)))
    if not a.tie:
        out.append(("lm_head.weight", (a.vocab, a.hidden)))
    return out


def make_tensor(name: str, shape: tuple[int, ...], seed: int, layers: int,
                dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    std = 0.02 / (math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1)
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def shards(shapes, dtype: torch.dtype, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The weights grouped in order into shards of at most shard_bytes (a bigger tensor alone)."""
    size = torch.tensor([], dtype=dtype).element_size()
    groups, current, used = [], [], 0
    for name, shape in shapes:
        n = math.prod(shape) * size
        if current and used + n > shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += n
    return groups + [current] if current else groups


def llama_config(a: argparse.Namespace) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads, max_position_embeddings=a.context,
                         rope_theta=a.rope_theta, tie_word_embeddings=a.tie, rms_norm_eps=1e-5,
                         torch_dtype=str(DTYPES[a.dtype_name]).removeprefix("torch."))
    config.architectures = ["LlamaForCausalLM"]
    return config


def write(a: argparse.Namespace, folder: Path, tokenizer) -> int:
    """Write config, shards, index and tokenizer into folder; the total weight bytes."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    dtype = DTYPES[a.dtype_name]
    groups = shards(tensor_shapes(a), dtype, a.shard_size)
    weight_map, total = {}, 0
    bar = tqdm(total=sum(len(g) for g in groups), desc="tensors", unit="tensor", file=sys.stderr)
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            tensors[name] = make_tensor(name, shape, a.seed, a.layers, dtype)
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = file
            bar.update()
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    llama_config(a).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the folder to write (must not exist)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published model's shape")
    for flag in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{flag}", type=int, help="overrides the preset's")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None,
                   help="tie the output layer to the embedding (default: the preset's, else tied)")
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--context", type=int, default=4096, help="max_position_embeddings (default: %(default)s)")
    p.add_argument("--dtype", dest="dtype_name", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shard-size", type=parse_size, default=2 * 2**30,
                   help="largest shard (default: 2GiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="model whose tokenizer to copy (default: the built-in)")
    a = p.parse_args(argv)
    base = dict(PRESETS.get(a.preset, dict(rope_theta=10000.0, tie=True)))
    for key in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "rope_theta", "tie"):
        if getattr(a, key) is not None:
            base[key] = getattr(a, key)
    missing = [k for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab") if k not in base]
    if missing:
        p.error(f"without --preset, give --{' --'.join(m.replace('_', '-') for m in missing)}")
    vars(a).update(base)
    if a.hidden % a.heads or a.heads % a.kv_heads or min(a.layers, a.hidden, a.intermediate, a.vocab) < 1:
        p.error("need positive sizes, hidden a multiple of heads and heads a multiple of kv-heads")
    if a.out.exists():
        p.error(f"--out {a.out} exists; choose a new folder")
    return a


def main(argv: list[str] | None = None) -> int:
    from mosaic_export.model.load import load_tokenizer

    a = arguments(argv)
    tokenizer = load_tokenizer(a.tokenizer)
    if len(tokenizer) > a.vocab:
        print(f"make_synthetic: error: the tokenizer has {len(tokenizer)} tokens, more than "
              f"--vocab {a.vocab}", file=sys.stderr)
        return 2
    # llama.cpp sizes the embedding by the vocabulary it reads: as many tokens as rows
    tokenizer.add_tokens([f"<synthetic_{i}>" for i in range(a.vocab - len(tokenizer))])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{a.out.name}.partial-{os.getpid()}-", dir=a.out.parent))
    try:
        total = write(a, tmp, tokenizer)
        mask = os.umask(0)
        os.umask(mask)
        for path in [tmp, *tmp.iterdir()]:  # as mkdir and open make them (mkdtemp's and safetensors' 0600)
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        tmp.rename(a.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {a.out}: {a.layers} layers, hidden {a.hidden}, {a.heads} heads over {a.kv_heads} KV "
          f"heads, MLP {a.intermediate}, vocab {a.vocab}; {total / 1e9:.2f} GB of {a.dtype_name} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
