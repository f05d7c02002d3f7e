"""Processes: this one's peak memory, its machine, and a runtime measurement run in a fresh one."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.measure import tree


def proc_bytes(path: str, key: str) -> int | None:
    """A ``Key:   N kB`` line of a /proc file, in bytes; None where there is no such file."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM). Not ru_maxrss: Linux carries that
    over exec from the forked parent, so a process started by one holding a model would report
    the parent's size."""
    hwm = proc_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB on Linux-likes


@contextmanager
def torch_threads(n: int | None):
    """torch's threads set to n for the block (None: left as they are), then restored."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_label() -> str:
    """This machine, for labelling what was measured on it: host name, CPU model, CPU count."""
    import platform
    import socket

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):  # x86; ARM boards
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{socket.gethostname()} ({cpu}, {os.cpu_count()} CPUs)"


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere).

    Tensors of a few MB freed in a loop stay in glibc's heap once its dynamic mmap threshold has
    risen past their size, and the heap fragments: over the 30 layers of a calibration pass that
    grew the resident set by about 400 MB. Trimming after each layer keeps the peak at the
    model plus one layer's work."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextmanager
def large_buffers_mapped(on: bool = True, threshold: int = 2**20) -> Iterator[None]:
    """For the time of the block serve every allocation of ``threshold`` bytes or more by a
    mapping of its own, returned to the system when freed (glibc's M_MMAP_THRESHOLD, fixed; a
    no-op elsewhere, or when not ``on``).

    glibc raises the threshold as large buffers are freed, and then serves buffers of that size
    from a heap that fragments between trims. A run under --max-rss holds this from its start
    (set later, the heap already holds free space that malloc serves first): SmolLM2-135M's
    streamed 30% run peaked at 485.7 MiB with it and 565.5 MiB without, and took 246 s against
    178 s (each new buffer's pages are mapped and zeroed afresh; BENCHMARKS.md). glibc's
    own adjustment cannot be turned back on: after the block the threshold is fixed at its
    ceiling, MMAP_CEILING."""
    if not on or _LIBC is None or not hasattr(_LIBC, "mallopt"):
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_CEILING)


MMAP_CEILING = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def decode_rates(steps: list[float]) -> dict:
    """Decode speed from per-token times: tokens/s is one over the median step (a scheduling
    hiccup on a shared machine moves the mean by several percent, the median not);
    mean_tokens_per_s is the plain throughput."""
    ordered = sorted(steps)
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return {"tokens": n, "seconds": sum(steps), "tokens_per_s": 1 / median,
            "mean_tokens_per_s": n / sum(steps)}


class RuntimeCrash(UserError):
    """A runtime's child process was killed by a signal (SIGSEGV, SIGILL, ...)."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


def signal_name(returncode: int) -> str | None:
    """'SIGSEGV' for a child killed by signal 11 (return code -11); None for a normal exit."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


PARENT_ENV = "MOSAIC_PARENT_PID"  # set for a runtime child: the process it must not outlive
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Called first thing in a runtime child: ask Linux to kill this process when the one that
    started it dies (even by SIGKILL), so no orphaned benchmark keeps running after mosaic-export
    is gone; exit at once if that already happened. (Not done between fork and exec: a parent
    holding torch's threads may deadlock there.)"""
    parent = os.environ.get(PARENT_ENV)
    if not parent or _LIBC is None or not hasattr(_LIBC, "prctl"):
        return
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before the request
        os._exit(1)


def run_child(module: str, args: list[str], runtime: str, what: str, name: str) -> dict:
    """Run ``python -m module ARGS --json FILE`` and return the JSON it writes.

    The child dies with this process. A failure is a UserError naming the runtime, what it was
    doing and ``name`` (the file as the user will know it, not a temporary path); a child killed by
    a signal is a RuntimeCrash ("llama.cpp crashed (SIGSEGV) while decoding model-Q8_0.gguf")."""
    with tempfile.TemporaryDirectory(prefix="mosaic-child-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *args, "--json", str(out)]
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        limit = tree.active()  # under --max-rss: the child held to what the limit leaves it
        try:
            if limit is not None:
                limit.adopt(proc.pid)
            stdout, stderr = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            stopped = limit is not None and limit.ended(proc.pid, (proc.returncode or 0) < 0)
        crashed = signal_name(proc.returncode)
        if stopped:
            raise limit.error()
        if crashed is not None:
            raise RuntimeCrash(f"{runtime} crashed ({crashed}) while {what} {name}", crashed)
        if proc.returncode != 0:
            lines = (stderr or stdout).strip().splitlines()
            tail = lines[-1] if lines else f"exit code {proc.returncode}, no output"
            raise UserError(f"{runtime} could not run {name} ({what}): "
                            f"{tail.removeprefix('mosaic-export: error: ')}")
        return json.loads(out.read_text())


def option_args(options: dict) -> list[str]:
    """{'eval_text': 'x', 'safe': True, 'context': None} -> ['--eval-text', 'x', '--safe']."""
    args: list[str] = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def measure_in_subprocess(module: str, target: Path, runtime: str, name: str | None = None,
                          **options) -> dict:
    """Run ``python -m module TARGET --json FILE [--option value ...]`` and return its JSON, so
    peak RSS and load time are the runtime's own, not this process's (which may hold a model).
    Options that are None are left out; a failure is a UserError naming the runtime."""
    return run_child(module, [str(target), *option_args(options)], runtime, "benchmarking",
                     name or Path(target).name)


def emit(result: dict, path: Path | None) -> None:
    """A runner child's JSON result: to the file its parent named, else to stdout."""
    text = json.dumps(result, indent=1)
    if path:
        path.write_text(text)
    else:
        print(text)


def report(call, path: Path | None) -> int:
    """A runner child's main: emit call()'s result; a UserError is one line on stderr, exit 2."""
    try:
        result = call()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit(result, path)
    return 0
