"""Deployable output for on-device apps: OUT/README.md, OUT/manifest.json, verify and run.

The manifest lists every file of OUT with its sha256 and size, the format (target, GGUF type or
ONNX dtype, the runtime file), each layer's sizes, the profile and budgets, predicted and
measured figures, the token ids and figures of the parity check, and the versions of the tool and
its runtimes. No timestamps: the same inputs give the same bytes. The README tells an app
developer what the files are and how to run them; it is written first, so that the manifest
covers it too (``finalize`` does both, in that order).

``verify(OUT)`` re-hashes every file (and refuses files the manifest does not list) and re-runs
the parity check of the build: the runtime file against the PyTorch checkpoint in OUT/model on
the recorded token ids, with the build's thresholds. ``generate(OUT, prompt)`` runs the target
runtime, greedy.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import UserError
from .units import format_bytes

MANIFEST = "manifest.json"
README = "README.md"
PLAN = "plan.json"
CHECKPOINT = "model"  # the resized PyTorch checkpoint inside OUT
MANIFEST_VERSION = 1
PACKAGES = ("torch", "transformers", "numpy", "gguf", "llama-cpp-python", "onnx", "onnxruntime",
            "tokenizers")
AGREEMENT_SLACK = 0.01  # verify may not agree less than the build did, beyond this
GENERATE_CONTEXT = 2048  # llama.cpp context for `run`: prompt and answer


# --- writing ---------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def files(folder: Path) -> list[str]:
    """Every file under folder but the manifest itself, as sorted relative posix paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p != folder / MANIFEST)


def file_table(folder: Path) -> dict[str, dict]:
    """Every file under folder but the manifest itself: relative path -> sha256 and size."""
    return {name: {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in files(folder)}


def runtime_format(report: dict) -> dict:
    """Which runtime file OUT holds (path relative to OUT), from the report of the build."""
    if "gguf" in report:
        g = report["gguf"]
        return {"target": "gguf", "quant": g["type"], "arch": g["arch"], "model_path": g["file"]}
    if "onnx" in report:
        o = report["onnx"]
        return {"target": "onnx", "dtype": o["dtype"], "opset": o.get("opset"),
                "model_path": f"{o['folder']}/model.onnx"}
    return {"target": None, "model_path": None}  # the PyTorch checkpoint OUT/model only


def layer_sizes(folder: Path) -> list[dict]:
    """Each decoder layer's n_head, n_kv, n_ff: from OUT/plan.json, else from the checkpoint's
    config.json (its ``mosaic_export`` entry, see model_io.save_checkpoint)."""
    from .model_io import CHECKPOINT_KEY
    from .plan import Plan

    if (folder / PLAN).is_file():
        return [dict(lp.dims.__dict__) for lp in Plan.load(folder / PLAN).layers]
    config = folder / CHECKPOINT / "config.json"
    try:
        return [dict(d) for d in json.loads(config.read_text(encoding="utf-8"))[CHECKPOINT_KEY]["layers"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{config}: no per-layer sizes ({type(e).__name__}: {e})") from None


def versions() -> dict:
    out = {"mosaic-export": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe(folder: Path, report: dict, parity_ids: Iterable[int] | None = None) -> dict:
    """The manifest without its file table."""
    fmt = runtime_format(report)
    recorded = (report[fmt["target"]].get("parity") or {}) if fmt["target"] else {}
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "model": report.get("model"),
        "layers": layer_sizes(folder),
        "profile": report.get("profile"),
        "budgets": report.get("budgets"),
        "cost": report.get("cost"),
        "parity": {**recorded, "ids": None if parity_ids is None else [int(t) for t in parity_ids]},
        "recovery": recovery_record(report.get("recovery")),
        "versions": versions(),
    }


def recovery_record(recovery: dict | None) -> dict | None:
    """How the model was recovered, without the per-step curve (report.json has it)."""
    if not recovery:
        return None
    keys = ("text", "text_seconds", "tokens", "steps", "windows", "first_loss", "final_loss",
            "seconds", "device", "resumed_from_step", "settings")
    return {k: recovery.get(k) for k in keys}


def write_manifest(folder: Path, report: dict, parity_ids: Iterable[int] | None = None) -> dict:
    """Write OUT/manifest.json (sorted keys, the sha256 of every other file) and return it."""
    manifest = {**describe(folder, report, parity_ids), "files": file_table(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                   encoding="utf-8")
    return manifest


def write_app_readme(folder: Path, manifest: dict) -> None:
    """Write OUT/README.md from the manifest (its file table is not needed: sizes are read
    from the folder)."""
    (folder / README).write_text(app_readme(folder, manifest), encoding="utf-8")


def finalize(folder: Path, report: dict, parity_ids: Iterable[int] | None) -> dict:
    """README.md first, then manifest.json over every file (README included); returns the
    manifest."""
    write_app_readme(folder, describe(folder, report, parity_ids))
    return write_manifest(folder, report, parity_ids)


# --- the README ------------------------------------------------------------------------------------

# (cost key, label, budget key, budget direction, formatter)
FIGURES = (("memory_bytes", "peak memory", "max_memory_bytes", "<=", format_bytes),
           ("decode_tokens_per_s", "decode tokens/s", "min_tokens_per_s", ">=", "{:.1f}".format),
           ("prefill_tokens_per_s", "prefill tokens/s", None, None, "{:.1f}".format),
           ("ttft_s", "time to first token", "max_ttft_s", "<=", "{:.2f} s".format))


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def layer_table(layers: list[dict]) -> list[str]:
    """Runs of consecutive layers of the same sizes, one table row each."""
    rows, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            d, span = layers[start], str(start) if i - 1 == start else f"{start}-{i - 1}"
            rows.append(f"| {span} | {d['n_head']} | {d['n_kv']} | {d['n_ff']} |")
            start = i
    return ["| layers | query heads | KV heads | MLP channels |", "|---|---|---|---|", *rows]


def figures_table(budgets, cost) -> list[str]:
    """Budget, predicted and measured figures; only rows with a number in them."""
    budgets = budgets if isinstance(budgets, dict) else {}
    cost = cost if isinstance(cost, dict) else {}
    predicted, measured = ({} if not isinstance(cost.get(k), dict) else cost[k]
                           for k in ("predicted", "measured"))
    rows = []
    for key, label, budget_key, op, fmt in FIGURES:
        budget = budgets.get(budget_key) if budget_key else None
        cells = [f"{op} {fmt(budget)}" if _number(budget) else "-",
                 *(fmt(d[key]) if _number(d.get(key)) else "-" for d in (predicted, measured))]
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    context = predicted.get("context") or budgets.get("context")
    note = [f"Peak memory with {context} tokens of context.", ""] if _number(context) else []
    return ["## Budgets and figures", "", *note,
            "| figure | budget | predicted | measured on the build machine |", "|---|---|---|---|",
            *rows, ""]


def run_section(fmt: dict) -> list[str]:
    path = fmt["model_path"]
    if fmt["target"] == "gguf":
        return ["## Run it", "", f"`{path}` is a GGUF file for stock llama.cpp (arch `{fmt['arch']}`, "
                f"type {fmt['quant']}; tokenizer and chat template, if any, inside):", "",
                f"    llama-cli -m {path} -cnv", "", "From Python (llama-cpp-python):", "",
                "```python", "from llama_cpp import Llama", "",
                f'llm = Llama(model_path="{path}", n_ctx=2048)',
                'reply = llm.create_chat_completion([{"role": "user", "content": "Hello"}], '
                "temperature=0)",
                'print(reply["choices"][0]["message"]["content"])', "```", ""]
    if fmt["target"] == "onnx":
        folder = path.split("/")[0]
        return ["## Run it", "",
                f"`{folder}/` holds `model.onnx` (weights in `model.onnx.data`, {fmt['dtype']}), the "
                "tokenizer files and `model_config.json` (per-layer sizes, head size, eos ids, chat "
                "template). One graph serves prefill and decode:", "",
                "    inputs   input_ids, attention_mask, position_ids   int64 (batch, tokens)",
                "             past_key_values.{i}.key / .value          (batch, layer i's KV heads,",
                "                                                        past tokens, head size)",
                "    outputs  logits (batch, tokens, vocab), present.{i}.key / .value", "",
                "Layer i's KV heads are `layers[i].n_kv` in `model_config.json`; an empty cache has "
                "0 past tokens. Greedy decoding with onnxruntime alone:", "",
                "```python", "import json", "", "import numpy as np", "import onnxruntime as ort",
                "from tokenizers import Tokenizer", "",
                f'cfg = json.load(open("{folder}/model_config.json"))',
                f'session = ort.InferenceSession("{folder}/model.onnx")',
                f'tok = Tokenizer.from_file("{folder}/tokenizer.json")',
                'past = {f"past_key_values.{i}.{kv}": np.zeros((1, layer["n_kv"], 0, cfg["head_dim"]), '
                'cfg["past_dtype"])',
                '        for i, layer in enumerate(cfg["layers"]) for kv in ("key", "value")}',
                'ids, out = tok.encode("Hello").ids, []',
                "for _ in range(32):",
                '    n = next(iter(past.values())).shape[2]',
                "    x = np.array([ids], np.int64)",
                '    feed = {"input_ids": x, "attention_mask": np.ones((1, n + len(ids)), np.int64),',
                '            "position_ids": np.arange(n, n + len(ids), dtype=np.int64)[None], **past}',
                "    logits, *present = session.run(None, feed)",
                "    past = dict(zip(past, present))",
                "    ids = [int(logits[0, -1].argmax())]",
                '    if ids[0] in cfg["eos_token_ids"]:', "        break", "    out += ids",
                "print(tok.decode(out))", "```", ""]
    return ["## Run it", "", "Built with `--target none`: only the PyTorch checkpoint `model/`, no "
            "runtime file.", ""]


def app_readme(folder: Path, manifest: dict) -> str:
    """A short README for the app developer."""
    fmt, layers = manifest["format"], manifest.get("layers") or []
    model = manifest.get("model") or {}
    profile = manifest.get("profile") or {}
    name = Path(model["source"]).stem if model.get("source") else "model"
    files = [f"`{CHECKPOINT}/`: the resized PyTorch checkpoint, "
             f"{format_bytes(tree_bytes(folder / CHECKPOINT))} "
             "(load it with `mosaic_export.model_io.load_model`)"]
    if fmt["target"] is not None:
        runtime = Path(fmt["model_path"]).parts[0]  # the GGUF file, or the ONNX folder
        engine = "llama.cpp" if fmt["target"] == "gguf" else "ONNX Runtime"
        slash = "/" if (folder / runtime).is_dir() else ""
        files.insert(0, f"`{runtime}{slash}`: the model for {engine}, "
                        f"{format_bytes(tree_bytes(folder / runtime))}")
    records = [f"`{n}`" for n in (PLAN, "report.json", "report.md") if (folder / n).is_file()]
    if records:
        files.append(", ".join(records) + ": how it was pruned and measured")
    files += ["`manifest.json`: every file's sha256 and size, the format, layer sizes, budgets, "
              "figures, parity check and versions"]
    lines = [f"# {name}, pruned by mosaic-export", ""]
    if profile.get("name"):
        lines += [f"Built for profile `{profile['name']}`"
                  + (f" ({profile['description']})" if profile.get("description") else "") + ".", ""]
    rec = manifest.get("recovery")
    if rec:
        lines += [f"After pruning it was distilled from the dense model on {rec['tokens']:,} tokens "
                  f"of {rec['text']} ({rec['steps']} steps, {rec['seconds']:.0f} s; distillation "
                  f"loss {rec['first_loss']:.3f} -> {rec['final_loss']:.3f}).", ""]
    lines += ["## Files", "", *(f"- {f}" for f in files), ""]
    if layers:
        lines += ["## Layers", "", f"{len(layers)} decoder layers, each at its own size:", "",
                  *layer_table(layers), ""]
    lines += figures_table(manifest.get("budgets"), manifest.get("cost"))
    lines += run_section(fmt)
    checks = [("mosaic-export verify .", "every file's sha256, and parity with PyTorch")]
    if fmt["target"]:
        checks.insert(0, ('mosaic-export run . --prompt "Hello"', "generate with the runtime"))
    lines += ["## Check it", "", *(f"    {c:<38}# {what}" for c, what in checks), ""]
    return "\n".join(lines)


# --- reading ---------------------------------------------------------------------------------------


def load_manifest(folder: Path) -> dict:
    """OUT/manifest.json, checked: the folder, the file, its version and the keys verify and run
    read (format, files with sha256 and bytes, parity ids)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such output folder")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: no {MANIFEST} (not an output folder of mosaic-export, or one "
                        "written before manifests)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}/{MANIFEST}: cannot be read: {e}") from None
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise UserError(f"{folder}/{MANIFEST}: manifest version {version} is not supported "
                        f"(expected {MANIFEST_VERSION})")
    where = f"{folder}/{MANIFEST}"
    fmt = _entry(manifest, "format", dict, where)
    target = _entry(fmt, "target", (str, type(None)), f"{where}: format")
    if target not in (None, "gguf", "onnx"):
        raise UserError(f"{where}: unknown format target {target!r}")
    if target is not None:
        _entry(fmt, "model_path", str, f"{where}: format")
        _entry(fmt, "quant" if target == "gguf" else "dtype", str, f"{where}: format")
    for name, entry in _entry(manifest, "files", dict, where).items():
        _entry(entry, "sha256", str, f"{where}: files: {name}")
        _entry(entry, "bytes", int, f"{where}: files: {name}")
    parity = manifest.get("parity") or {}
    if not isinstance(parity, dict):
        raise UserError(f"{where}: 'parity' is not an object")
    ids = parity.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):
        raise UserError(f"{where}: parity: 'ids' is not a list of token ids")
    return manifest


def _entry(data, key: str, kind, where: str):
    """data[key], which must exist and be of this type; else UserError naming where."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise UserError(f"{where}: missing key '{key}'")
    if not isinstance(data[key], kind) or isinstance(data[key], bool):
        raise UserError(f"{where}: '{key}' has the wrong type ({type(data[key]).__name__})")
    return data[key]


def check_files(folder: Path, listed: dict) -> None:
    """Every listed file present with its size and sha256; nothing else but the manifest."""
    for name, entry in sorted(listed.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"verify: the manifest names a file outside the folder: {name}")
        if not path.is_file():
            raise UserError(f"verify: {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise UserError(f"verify: {name} has changed: {path.stat().st_size} bytes, the manifest "
                            f"says {entry['bytes']}")
        if sha256(path) != entry["sha256"]:
            raise UserError(f"verify: {name} has changed: its sha256 differs from the manifest")
    extra = [name for name in files(folder) if name not in listed]
    if extra:
        raise UserError(f"verify: {extra[0]} is not in the manifest")


def check_parity(folder: Path, fmt: dict, recorded: dict, threads: int | None) -> dict:
    """The build's parity check again, on the recorded ids, with the build's thresholds; the
    agreement also may not fall more than AGREEMENT_SLACK below the recorded one."""
    import torch

    from .model_io import load_model

    if not recorded.get("ids"):
        raise UserError("verify: the manifest records no parity token ids; cannot re-check parity")
    loaded = load_model(str(folder / CHECKPOINT))
    ids = torch.tensor(recorded["ids"], dtype=torch.long)
    path = folder / fmt["model_path"]
    if fmt["target"] == "gguf":
        from .targets.gguf import MIN_AGREEMENT as GGUF_FLOORS
        from .targets.gguf_runner import next_token_agreement

        probe = recorded.get("tokenizer_probe") or {}
        parity = next_token_agreement(loaded.model, path, ids, threads, text=probe.get("text"),
                                      name=fmt["model_path"])
        if probe.get("ids") is not None and parity.pop("text_ids") != probe["ids"]:
            raise UserError(f"verify: {fmt['model_path']}: llama.cpp tokenizes the recorded probe text "
                            f"differently from the build's reference ({probe.get('reference')})")
        floor = GGUF_FLOORS.get(fmt["quant"], 0.0)
    else:
        from .targets.onnx import MAX_FP32_LOGIT_DIFF, MIN_AGREEMENT
        from .targets.onnx import parity as onnx_parity

        parity = onnx_parity(loaded, path.parent, ids, threads=threads)
        floor = MIN_AGREEMENT[fmt["dtype"]]
        if fmt["dtype"] == "fp32" and not parity["max_abs_logit_diff"] <= MAX_FP32_LOGIT_DIFF:
            raise UserError(f"verify: {fmt['model_path']}: max |logit difference| to PyTorch "
                            f"{parity['max_abs_logit_diff']:.2e} > {MAX_FP32_LOGIT_DIFF:g}")
    at_build = recorded.get("top1_agreement")
    if _number(at_build):
        floor = max(floor, at_build - AGREEMENT_SLACK)
    if not parity["top1_agreement"] >= floor:
        raise UserError(f"verify: {fmt['model_path']}: greedy next-token agreement with PyTorch "
                        f"{parity['top1_agreement']:.1%} < {floor:.1%}"
                        + (f" (at build: {at_build:.1%})" if _number(at_build) else ""))
    return {**parity, "min_agreement": floor}


def verify(folder: Path, threads: int | None = None, log=print) -> dict:
    """Checksums of every file, then the build's parity check again; UserError on the first
    failure. Returns what was checked."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    fmt, listed = manifest["format"], manifest["files"]
    check_files(folder, listed)
    log(f"files: {len(listed)} files match the sha256 and size in {MANIFEST}, no others")
    result = {"files": len(listed), "target": fmt["target"], "parity": None}
    if fmt["target"] is None:
        log("parity: none to check (checkpoint only)")
        return result
    parity = check_parity(folder, fmt, manifest.get("parity") or {}, threads)
    log(f"parity: {fmt['model_path']} agrees with PyTorch on the greedy next token at "
        f"{parity['top1_agreement']:.1%} of {parity['positions']} positions (needed "
        f"{parity['min_agreement']:.1%}), max |logit difference| {parity['max_abs_logit_diff']:.2e}")
    return {**result, "parity": parity}


# --- running ---------------------------------------------------------------------------------------


def generate(folder: Path, prompt: str, max_tokens: int = 64, chat: bool = True,
             threads: int | None = None) -> str:
    """Greedy generation with the target runtime (the chat template when the model has one and
    ``chat``); returns the generated text."""
    folder = Path(folder)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    fmt = load_manifest(folder)["format"]
    if fmt["target"] is None:
        raise UserError(f"{folder} holds only the PyTorch checkpoint (built with --target none): "
                        "no runtime file to run")
    path = folder / fmt["model_path"]
    if not path.is_file():
        raise UserError(f"{folder}: the runtime file {fmt['model_path']} is missing")
    if fmt["target"] == "gguf":
        return _generate_gguf(path, prompt, max_tokens, chat, threads)
    return _generate_onnx(path.parent, prompt, max_tokens, chat, threads)


def _generate_gguf(path: Path, prompt: str, max_tokens: int, chat: bool, threads: int | None) -> str:
    from .targets.gguf_runner import run_llama

    return run_llama("generate", path, prompt=prompt, max_tokens=max_tokens, no_chat=not chat,
                     threads=threads, context=GENERATE_CONTEXT)["text"]


def _generate_onnx(folder: Path, prompt: str, max_tokens: int, chat: bool, threads: int | None) -> str:
    from transformers import AutoTokenizer

    from .targets.onnx_runner import OnnxDecoder

    decoder = OnnxDecoder(folder, threads=threads)
    tok = AutoTokenizer.from_pretrained(folder)
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty")
    out = decoder.generate(list(ids), max_tokens, stop_at_eos=True)
    if out and out[-1] in decoder.config["eos_token_ids"]:
        out = out[:-1]
    return tok.decode(out)
