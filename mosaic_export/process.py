"""Processes: this one's peak memory, and a runtime measurement run in a fresh one."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UserError


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM). Not ru_maxrss: Linux carries that
    over exec from the forked parent, so a process started by one holding a model would report
    the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB on Linux-likes


def measure_in_subprocess(module: str, target: Path, runtime: str, **options) -> dict:
    """Run ``python -m module TARGET --json FILE [--option value ...]`` and return its JSON, so
    peak RSS and load time are the runtime's own, not this process's (which may hold a model).
    Options that are None are left out; a failure is a UserError naming the runtime."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, str(target), "--json", str(out)]
        for key, value in options.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"{runtime} could not run {target}: {tail[0]}")
        return json.loads(out.read_text())
