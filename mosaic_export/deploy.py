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

from . import __version__, targets
from .errors import UserError
from .units import format_bytes

MANIFEST = "manifest.json"
README = "README.md"
PLAN = "plan.json"
CHECKPOINT = "model"  # the resized PyTorch checkpoint inside OUT
MANIFEST_VERSION = 1
PACKAGES = ("torch", "transformers", "numpy", "tokenizers")  # and each target's (Target.packages)
AGREEMENT_SLACK = 0.01  # verify may not agree less than the build did, beyond this


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
    from .report import runtime_section

    built = runtime_section(report)
    if built is None:
        return {"target": None, "model_path": None}  # the PyTorch checkpoint OUT/model only
    target, section = built
    return {"target": target.name, **target.manifest_format(section)}


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
    for name in dict.fromkeys((*PACKAGES, *(p for t in targets.registered() for p in t.packages))):
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
    if fmt["target"] is not None:
        return targets.get(fmt["target"]).readme_run(fmt)
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
        engine = targets.get(fmt["target"]).engine
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
    if target is not None and target not in targets.names():
        raise UserError(f"{where}: unknown format target {target!r}")
    if target is not None:
        _entry(fmt, "model_path", str, f"{where}: format")
        _entry(fmt, targets.get(target).option, str, f"{where}: format")
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
    parity, floor = targets.get(fmt["target"]).verify_parity(loaded, folder / fmt["model_path"], fmt,
                                                             ids, recorded, threads)
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
    return targets.get(fmt["target"]).generate(path, prompt, max_tokens, chat, threads)
