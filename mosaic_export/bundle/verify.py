"""`mosaic-export verify OUT`: every file against the sha256 and size in manifest.json (and no
file the manifest does not list), then the build's parity check again: the runtime file against the
PyTorch checkpoint in OUT/model on the recorded token ids, with the build's thresholds. A
checkpoint bigger than half the memory available (or any, with ``stream``) is read a layer at a
time, as a streamed run reads its model (README.md, "Models bigger than memory")."""

from __future__ import annotations

from pathlib import Path

from mosaic_export import targets
from mosaic_export.bundle.deploy import files, load_manifest, sha256
from mosaic_export.bundle.files import CHECKPOINT, MANIFEST
from mosaic_export.bundle.readme import is_number
from mosaic_export.core.errors import UserError
from mosaic_export.measure.process import proc_bytes
from mosaic_export.model.load import load_model

AGREEMENT_SLACK = 0.01  # verify may not agree less than the build did, beyond this


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


def streams(folder: Path, stream: bool) -> bool:
    """Whether to read the checkpoint a layer at a time: asked, or its weights are more than half
    of the memory available."""

    available = proc_bytes("/proc/meminfo", "MemAvailable")
    size = sum(f.stat().st_size for f in (folder / CHECKPOINT).glob("*.safetensors"))
    return stream or (available is not None and size > available // 2)


def check_parity(folder: Path, fmt: dict, recorded: dict, threads: int | None, stream: bool = False) -> dict:
    """The build's parity check again, on the recorded ids, with the build's thresholds; the
    agreement also may not fall more than AGREEMENT_SLACK below the recorded one."""
    import torch

    if not recorded.get("ids"):
        raise UserError("verify: the manifest records no parity token ids; cannot re-check parity")
    loaded = load_model(str(folder / CHECKPOINT), stream=stream)
    ids = torch.tensor(recorded["ids"], dtype=torch.long)
    parity, floor = targets.get(fmt["target"]).verify_parity(loaded, folder / fmt["model_path"], fmt,
                                                             ids, recorded, threads)
    at_build = recorded.get("top1_agreement")
    if is_number(at_build):
        floor = max(floor, at_build - AGREEMENT_SLACK)
    if not parity["top1_agreement"] >= floor:
        raise UserError(f"verify: {fmt['model_path']}: greedy next-token agreement with PyTorch "
                        f"{parity['top1_agreement']:.1%} < {floor:.1%}"
                        + (f" (at build: {at_build:.1%})" if is_number(at_build) else ""))
    return {**parity, "min_agreement": floor}


def verify(folder: Path, threads: int | None = None, log=print, stream: bool = False) -> dict:
    """Checksums of every file, then the build's parity check again (the checkpoint streamed: see
    streams); UserError on the first failure. Returns what was checked."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    fmt, listed = manifest["format"], manifest["files"]
    check_files(folder, listed)
    log(f"files: {len(listed)} files match the sha256 and size in {MANIFEST}, no others")
    result = {"files": len(listed), "target": fmt["target"], "parity": None}
    if fmt["target"] is None:
        log("parity: none to check (checkpoint only)")
        return result
    stream = streams(folder, stream)
    if stream:
        log("parity: the checkpoint read a layer at a time")
    parity = check_parity(folder, fmt, manifest.get("parity") or {}, threads, stream)
    log(f"parity: {fmt['model_path']} agrees with PyTorch on the greedy next token at "
        f"{parity['top1_agreement']:.1%} of {parity['positions']} positions (needed "
        f"{parity['min_agreement']:.1%}), max |logit difference| {parity['max_abs_logit_diff']:.2e}")
    return {**result, "parity": parity}
