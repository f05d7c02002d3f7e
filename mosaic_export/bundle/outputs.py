"""The output folder: checked at the door, built under a temporary name beside it, moved into place
only when complete; what a killed earlier run left is cleaned up. Never a half-written OUT."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_export.bundle.files import MANIFEST
from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes

if TYPE_CHECKING:
    from mosaic_export.decide.costmodel import Pricing
    from mosaic_export.method.plan import Plan


def _ours(manifest: Path) -> bool:
    """Whether a manifest.json is one this tool wrote (it carries manifest_version)."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "manifest_version" in data


# what a sweep writes beside its runs
SWEEP_FILES = ("sweep.csv", "sweep.json", "pareto.png", "report.md", "run.toml")


def is_tool_output(folder: Path) -> bool:
    """A folder this tool wrote: a manifest.json of ours, or a sweep (sweep.csv, and nothing but
    the sweep's own files and runs, each run a folder with a manifest.json of ours)."""

    if _ours(folder / MANIFEST):
        return True
    entries = list(folder.iterdir())
    runs = [p for p in entries if p.is_dir()]
    return ((folder / "sweep.csv").is_file() and bool(runs) and all(_ours(p / MANIFEST) for p in runs)
            and all(p.is_dir() or p.name in SWEEP_FILES for p in entries))


def check_replaceable(out: Path) -> None:
    """--force replaces only an output of this tool or an empty folder, and never the current
    folder or one above it."""
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"--force will not replace {out}: it holds the current folder")
    if any(out.iterdir()) and not is_tool_output(out):
        raise UserError(f"--force will not replace {out}: it is not an output folder of "
                        "mosaic-export (no manifest.json) and not empty")


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if out.exists():
        check_replaceable(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: folder {parent} is not writable")



def output_bytes_needed(plan: Plan, pricing: Pricing | None, dense_total_params: int,
                        scratch: int = 0) -> int:
    """Disk the outputs take at their largest: the float32 checkpoint, the runtime file (its exact
    weight bytes when priced) and the float32 file its export starts from where it needs one
    (Target.float32_first), with 10% to spare; and ``scratch`` bytes of the run's own (a streamed
    run's calibration states)."""
    params = plan.params()
    total = dense_total_params - (params["decoder_dense"] - params["decoder_resized"])
    runtime = 0
    if pricing is not None:
        dims, shape = [lp.dims for lp in plan.layers], pricing.shape
        rows = {shape.hidden, *(d.n_head * shape.head_dim for d in dims), *(d.n_ff for d in dims)} - {0}
        first = 4 * total if pricing.fmt.spec.float32_first(pricing.fmt.name, rows) else 0
        runtime = first + pricing.cost(dims).weight_bytes
    return int(1.1 * (4 * total + runtime)) + scratch + 16 * 2**20


def check_free_space(out: Path, plan: Plan, pricing: Pricing | None, dense_total_params: int,
                     scratch: int = 0) -> None:
    """Refuse before the long work when the disk cannot hold the outputs (and ``scratch``)."""
    need = output_bytes_needed(plan, pricing, dense_total_params, scratch)
    parent = out.resolve().parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(f"not enough free space for {out}: the outputs need about "
                        f"{format_bytes(need)}, {parent} has {format_bytes(free)} free")


TMP_INFIX = ".tmp-"  # OUT is built in .OUT.tmp-PID-XXXX beside it


def stale_temporaries(out: Path) -> tuple[list[Path], list[Path]]:
    """Temporary folders an earlier run left beside OUT: (those whose process is gone, those
    whose process may still run). The folder name carries the process id."""
    gone, unknown = [], []
    for path in sorted(out.parent.glob(f".{out.name}{TMP_INFIX}*")):
        pid_text = path.name[len(f".{out.name}{TMP_INFIX}"):].split("-")[0]
        if not pid_text.isdigit():  # written before names carried the process id
            unknown.append(path)
        elif not _alive(int(pid_text)):
            gone.append(path)
    return gone, unknown


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path, log=print) -> None:
    """Remove what a killed earlier run left beside OUT; name what may belong to a live run."""
    gone, unknown = stale_temporaries(out)
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path.name}, left by an earlier run that was killed")
    for path in unknown:
        log(f"mosaic-export: warning: {path} was left by an earlier run (it may still be running); "
            "delete it if not")


def write_outputs(out: Path, force: bool, build: Callable[[Path], None], log=print,
                  work: Path | None = None) -> None:
    """Let build() write everything into a temporary folder beside OUT, then move it into place.

    On any failure (a signal included: the CLI turns SIGTERM and SIGHUP into an exception) the
    temporary folder is removed: OUT is either complete or untouched. Temporary folders of
    earlier runs that were killed outright (SIGKILL, power) are removed first. ``work``: a
    hidden folder beside OUT that already holds part of the output (a sweep's finished runs),
    used instead of a new one and kept on failure, so that the work can be resumed."""
    out = out.resolve()
    clean_stale(out, log)
    tmp = work or Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}{os.getpid()}-", dir=out.parent))
    discard = work is None
    try:
        build(tmp)
        mask = os.umask(0)
        os.umask(mask)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers use 0600
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        if out.exists():
            if not force:
                raise UserError(f"output folder {out} appeared while working; not replacing it")
            check_replaceable(out)
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        if discard:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"cannot write {out}: {e.strerror or e}{where}") from None
    except BaseException as e:
        if discard:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, UserError | KeyboardInterrupt) and disk_full(out.parent, e):
            raise UserError(f"cannot write {out}: no space left on the device "
                            f"({format_bytes(shutil.disk_usage(out.parent).free)} free)") from None
        raise


def disk_full(folder: Path, error: BaseException) -> bool:
    """Did error come from a full disk? (Libraries wrap ENOSPC in their own exception types.)"""
    return "No space left" in str(error) or shutil.disk_usage(folder).free < 2**20
