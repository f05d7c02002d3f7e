"""Deployable output for on-device apps: OUT/manifest.json (and, through readme.py, OUT/README.md).

The manifest lists every file of OUT with its sha256 and size, the format (target, GGUF type or
ONNX dtype, the runtime file), each layer's sizes, the profile and budgets, predicted and
measured figures, the token ids and figures of the parity check, and the versions of the tool and
its runtimes. No timestamps: the same inputs give the same bytes. The README tells an app
developer what the files are and how to run them; it is written first, so that the manifest
covers it too (``finalize`` does both, in that order).

``load_manifest`` reads it back, checked; verify.py re-checks OUT against it, generate.py runs it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from mosaic_export import targets
from mosaic_export.bundle.files import CHECKPOINT, MANIFEST, PLAN
from mosaic_export.bundle.plots import cost_plot, front_plot, pod_heatmap, recovery_plot
from mosaic_export.bundle.readme import write_app_readme
from mosaic_export.bundle.report import runtime_section, write_markdown
from mosaic_export.core.errors import UserError
from mosaic_export.core.version import __version__
from mosaic_export.method.plan import Plan
from mosaic_export.model.folder import CHECKPOINT_KEY

MANIFEST_VERSION = 1
PACKAGES = ("torch", "transformers", "numpy", "tokenizers")  # and each target's (Target.packages)


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

    built = runtime_section(report)
    if built is None:
        return {"target": None, "model_path": None}  # the PyTorch checkpoint OUT/model only
    target, section = built
    return {"target": target.name, **target.manifest_format(section)}


def layer_sizes(folder: Path) -> list[dict]:
    """Each decoder layer's n_head, n_kv, n_ff: from OUT/plan.json, else from the checkpoint's
    config.json (its ``mosaic_export`` entry, see checkpoint.py)."""

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


def finalize(folder: Path, report: dict, parity_ids: Iterable[int] | None) -> dict:
    """README.md first, then manifest.json over every file (README included); returns the
    manifest."""

    write_app_readme(folder, describe(folder, report, parity_ids))
    return write_manifest(folder, report, parity_ids)


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


def bundle(report: dict, plan, folder: Path, parity_ids: list[int]) -> None:
    """The plan, the plots, report.md and report.json, then the app README and the manifest."""

    plan.save(folder / "plan.json")
    pod_heatmap(plan, folder / "pod.png")
    if "cost" in report:
        cost_plot(report["cost"], folder / "cost.png")
    if "recovery" in report:
        recovery_plot(report["recovery"], folder / "recovery.png")
    if "joint" in report:
        front_plot(report["joint"], folder / "front.png")
    write_markdown(report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    finalize(folder, report, parity_ids)  # README.md, then manifest.json over all
