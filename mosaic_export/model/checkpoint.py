"""The resized checkpoint: written, read back and checked.

It is a Hugging Face folder: config.json with one more entry, ``mosaic_export`` (the per-layer
head, KV head and MLP sizes), safetensors shards (weights.shard_names: one for what is outside
the decoder layers, one per layer) and their index, the generation config and the tokenizer.
``load_resized`` builds the model at the config's dense sizes without initialising it, rebuilds
every layer at its recorded sizes, then loads the weights strictly; a streamed load
(model_io.load_model(stream=True)) rebuilds the layers the same way on the meta device
(``layout``, ``resize_to``) and reads them one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mosaic_export.core.errors import UserError
from mosaic_export.model.arch import LayerDims, ModelShape, arch_for
from mosaic_export.model.folder import (
    CHECKPOINT_KEY,
    CHECKPOINT_VERSION,
    LoadedModel,
    check_tokenizer,
    read_generation_config,
    weight_files,
)
from mosaic_export.model.resize import leading, resize_model
from mosaic_export.model.weights import layer_tensors, shard_names, table_module, table_rows, write_shard


def save_checkpoint(loaded: LoadedModel, folder: Path) -> None:
    """The weights as shards (weights.shard_names: one for what is outside the decoder layers,
    one per layer, the same bytes in memory and streamed; a streamed model's layer shards, written
    by its last pass, are moved in), their index, config.json with the per-layer sizes added (see
    load_resized; written the way transformers writes it: sorted keys, indent 2), the generation
    config and the tokenizer."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, spec = loaded.model, loaded.spec
    names = shard_names(loaded.shape.n_layers)
    tied = {"lm_head.weight"} if loaded.shape.tied_embeddings else set()
    outside = {k: v for k, v in model.state_dict().items()
               if not k.startswith(spec.layers + ".") and k not in tied}
    outside.update(_tables(loaded))
    total = write_shard(folder / names[0], outside)
    weight_map = dict.fromkeys(outside, names[0])
    for i, (layer, name) in enumerate(zip(spec.layer_list(model), names[1:], strict=True)):
        tensors = layer_tensors(layer, f"{spec.layers}.{i}.")
        if loaded.weights is None:
            total += write_shard(folder / name, tensors)
        else:  # the shard its last pass wrote, under this name (weights.shard_names)
            total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    if loaded.weights is not None:
        loaded.weights.move(folder)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    # the weights are float32 whatever the source's dtype (a streamed model's config keeps it)
    config = {**model.config.to_diff_dict(), "architectures": [type(model).__name__], "dtype": "float32"}
    config[CHECKPOINT_KEY] = {
        "version": CHECKPOINT_VERSION,
        "dense_shape": loaded.shape.to_dict(),
        "layers": [dims.__dict__ for dims in loaded.layer_dims],
        "source_gguf": str(loaded.gguf_file) if loaded.gguf_file else None,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def _tables(loaded: LoadedModel) -> dict:
    """The embedding and (untied) output tables by their names in the checkpoint, each written a
    chunk of rows at a time: never whole in memory when streamed."""

    model = loaded.model
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(table_module(model, which))] + ".weight": table_rows(model, loaded.weights, which)
            for which in (("input",) if loaded.shape.tied_embeddings else ("input", "output"))}


def layout(folder: Path, config) -> tuple[ModelShape, list[LayerDims], Path | None]:
    """A resized checkpoint's dense shape, per-layer sizes and source GGUF, taken out of its
    config (which is left at the dense sizes)."""
    meta = getattr(config, CHECKPOINT_KEY)
    if meta.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{folder}: checkpoint version {meta.get('version')} is not supported")
    delattr(config, CHECKPOINT_KEY)
    return (ModelShape(**meta["dense_shape"]), [LayerDims(**d) for d in meta["layers"]],
            Path(meta["source_gguf"]) if meta.get("source_gguf") else None)


def resize_to(loaded: LoadedModel, layer_dims: list[LayerDims]) -> None:
    """Every layer rebuilt at its recorded sizes (the leading heads and channels: the weights
    are whatever the checkpoint holds), on whatever device its parameters are."""
    resize_model(loaded, [leading(loaded.shape.dense_dims, dims) for dims in layer_dims])


def load_resized(folder: Path, source: str | None = None) -> LoadedModel:
    """Rebuild a resized checkpoint at its recorded per-layer sizes and load its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    shape, layer_dims, gguf_file = layout(folder, config)
    spec = arch_for(config.model_type)
    check_tokenizer(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = LoadedModel(model, None, spec, shape, source or str(folder), gguf_file)
    resize_to(loaded, layer_dims)
    state = {}
    for f in weight_files(folder):
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors' SafetensorError: a corrupt file
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a size mismatch
        if "size mismatch" not in str(e):
            raise
        raise UserError(f"{folder}: weights do not match the recorded sizes: "
                        f"{' '.join(str(e).split())[:300]}") from None
    tied = {"lm_head.weight"} if shape.tied_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"{folder}: weights do not match the recorded sizes "
                        f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    model.eval()
    read_generation_config(model, folder)
    loaded.tokenizer = AutoTokenizer.from_pretrained(folder)
    return loaded


def reload_shapes(loaded: LoadedModel, folder: Path) -> dict:
    """A streamed run's checkpoint: the files its index names read back, every weight of the
    resized model there once, at its shape (the layers are the very files the last pass wrote)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in loaded.model.state_dict().items()}
    if loaded.shape.tied_embeddings:
        expected.pop("lm_head.weight", None)
    found = {}
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as handle:
            for name in handle.keys():
                found[name] = tuple(handle.get_slice(name).get_shape())
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise RuntimeError(f"the checkpoint written in {folder} does not hold the resized model: "
                           f"{', '.join(wrong[:5])}")
    return {"tensors_checked": len(found), "streamed": True}


@torch.no_grad()
def reload_check(loaded: LoadedModel, folder: Path, ids: torch.Tensor) -> dict:
    """Reload the saved checkpoint and compare its logits with the in-memory model's on ids."""
    again = load_resized(folder)
    diff = (again.model(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    del again
    result = {"max_abs_logit_diff": float(diff), "tokens": int(ids.numel())}
    if not diff < 1e-4:
        raise RuntimeError(f"reloaded checkpoint differs from the pruned model: {result}")
    return result
