"""Memory of a process tree: this process and the runtime children it starts, added up, and
``--max-rss`` as a limit on that sum.

The runtimes (llama.cpp, ONNX Runtime) run in child processes, one at a time, while this process
holds what it holds; a limit that counts only this process is no limit. So under a limit:

- a watch thread reads the resident set (VmRSS) of this process and of each child every
  POLL_S seconds and keeps the peak of their sum; past the limit it kills the children and
  interrupts this process, which stops with the figure (MemoryLimitExceeded, a UserError: the
  output is built in a temporary folder, so nothing is half-written);
- each child is also put into a memory cgroup of its own, limited to what the limit leaves
  (the limit less this process's resident set when the child starts), where the system lets
  this process make one (cgroup v1 or v2, writable: root in most containers); the kernel then
  holds the child to it. Elsewhere the watch alone enforces it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes

POLL_S = 0.05
LIMIT_SIGNAL = signal.SIGUSR1


class MemoryLimitExceeded(UserError):
    """The process tree went over --max-rss; the run stopped."""


def rss_bytes(pid: int) -> int:
    """The resident set of a process (VmRSS), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children(pid: int) -> list[int]:
    """The direct children of a process (from /proc/PID/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in task.read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def tree_rss(pid: int | None = None) -> tuple[int, dict[int, int]]:
    """The resident set of a process and its descendants: (their sum, each one's)."""
    pid = pid or os.getpid()
    each = {p: rss_bytes(p) for p in [pid, *descendants(pid)]}
    return sum(each.values()), each


class _Cgroups:
    """Memory cgroups for children, where this process may make them (v1, or v2 with the memory
    controller delegated to its children); else none. One group a child, removed when it ends."""

    def __init__(self, base: tuple[Path | None, str] | None = None):
        self.base, self.limit_file = base if base is not None else cgroup_base()
        self.limits: dict[int, int] = {}  # each confined child's limit, as applied

    def _group(self, pid: int) -> Path:
        return self.base / f"mosaic-{os.getpid()}-{pid}"

    def confine(self, pid: int, limit: int) -> bool:
        """Put the process into a new cgroup limited to ``limit`` bytes; False where not possible."""
        if self.base is None:
            return False
        group = self._group(pid)
        try:
            group.mkdir()
            (group / self.limit_file).write_text(str(max(limit, 1 << 20)))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            return False
        self.limits[pid] = max(limit, 1 << 20)
        return True

    def oom_killed(self, pid: int) -> bool:
        """Whether the kernel killed something in the child's cgroup for memory."""
        if pid not in self.limits:
            return False
        for name in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in (self._group(pid) / name).read_text().splitlines():
                    if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                        return True
        return False

    def release(self, pid: int) -> None:
        """Remove the group of a child that has ended."""
        if self.limits.pop(pid, None) is not None:
            with contextlib.suppress(OSError):
                self._group(pid).rmdir()

    def remove(self) -> None:
        for pid in list(self.limits):
            self.release(pid)


def cgroup_base(proc_cgroup: str | None = None,
                root: Path = Path("/sys/fs/cgroup")) -> tuple[Path | None, str]:
    """This process's memory cgroup folder, if it may make groups under it: (folder, the limit
    file's name: memory.limit_in_bytes for v1, memory.max for v2), or (None, ""). ``proc_cgroup``:
    the text of /proc/self/cgroup (read when None)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None, ""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):  # v1: the memory hierarchy
            folder, limit_file = root / "memory" / path.lstrip("/"), "memory.limit_in_bytes"
            usable = (folder / limit_file).exists()
        elif controllers == "":  # v2: children get memory.max only where memory is delegated
            folder, limit_file = root / path.lstrip("/"), "memory.max"
            try:
                usable = "memory" in (folder / "cgroup.subtree_control").read_text().split()
            except OSError:
                usable = False
        else:
            continue
        if usable and os.access(folder, os.W_OK):
            return folder, limit_file
    return None, ""


class MemoryLimit:
    """Hold this process and its children to ``limit`` bytes together while the block runs (see
    the module's docstring); ``peak`` is the largest sum seen. Install from the main thread.
    Not ``armed``: the peak is watched, the limit enforced only once arm() is called."""

    def __init__(self, limit: int, poll_s: float = POLL_S, use_cgroups: bool = True, armed: bool = True):
        self.limit, self.poll_s = limit, poll_s
        self.armed = armed
        self.peak, self.peak_each = 0, {}
        self.exceeded: str | None = None  # the message, once over the limit
        self._cgroups = _Cgroups() if use_cgroups else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = None
        self._closing = False

    def arm(self) -> None:
        """Enforce the limit from now on (a run arms it once its estimate passed the door)."""
        self.armed = True
        self._sample()

    def child_limit(self) -> int:
        """What a child may hold: the limit less this process's resident set now."""
        return self.limit - rss_bytes(os.getpid())

    def adopt(self, pid: int) -> bool:
        """A child just started: once armed, confine it to child_limit() where cgroups allow (True
        if so). Before (the door's checks) it is only watched."""
        return self.armed and self._cgroups is not None and self._cgroups.confine(pid, self.child_limit())

    def ended(self, pid: int, killed: bool) -> bool:
        """A child ended (``killed``: by a signal): its group removed; whether it was stopped for
        memory (by the watch or its cgroup)."""
        stopped = False
        if killed and self._cgroups is not None and self._cgroups.oom_killed(pid):
            if self.exceeded is None:
                self.exceeded = (f"a runtime process went over the {format_bytes(self._cgroups.limits[pid])} "
                                 f"that --max-rss {format_bytes(self.limit)} left it beside this process")
            stopped = True
        if self._cgroups is not None:
            self._cgroups.release(pid)
        return stopped or (killed and self.exceeded is not None)

    def error(self) -> MemoryLimitExceeded:
        return MemoryLimitExceeded(f"{self.exceeded}; stopped, nothing was written")

    def _sample(self) -> None:
        total, each = tree_rss()
        if total > self.peak:
            self.peak, self.peak_each = total, each
        if total > self.limit and self.armed and self.exceeded is None:
            largest = max(each.items(), key=lambda kv: kv[1])
            who = "this process" if largest[0] == os.getpid() else f"a runtime process ({largest[0]})"
            self.exceeded = (f"this run and its runtime processes held {format_bytes(total)}, over "
                             f"--max-rss {format_bytes(self.limit)} (the largest, {who}: "
                             f"{format_bytes(largest[1])})")
            for pid in each:
                if pid != os.getpid():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            if self._previous is not None and not self._closing:  # the main thread stops at its next
                signal.pthread_kill(threading.main_thread().ident, LIMIT_SIGNAL)  # instruction

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._sample()

    def _on_signal(self, signum, frame):
        if self.exceeded is not None and not self._closing:
            raise self.error()

    def __enter__(self) -> MemoryLimit:
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():  # else: children stopped, no signal
            self._previous = signal.signal(LIMIT_SIGNAL, self._on_signal)
        self._thread = threading.Thread(target=self._watch, name="max-rss watch", daemon=True)
        self._thread.start()
        _ACTIVE = self
        self._sample()
        return self

    def __exit__(self, *exc) -> None:
        """Stop the watch (a signal it sent now does nothing), restore the handler, remove the
        groups: all of it, whatever is raised meanwhile."""
        global _ACTIVE
        self._closing = True
        _ACTIVE = None
        try:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        finally:
            try:
                if self._previous is not None:
                    signal.signal(LIMIT_SIGNAL, self._previous)
            finally:
                if self._cgroups is not None:
                    self._cgroups.remove()


_ACTIVE: MemoryLimit | None = None


def active() -> MemoryLimit | None:
    """The limit in force in this process, if any (process.run_child confines its children to it)."""
    return _ACTIVE


@contextlib.contextmanager
def limited(limit: int | None, armed: bool = True):
    """MemoryLimit(limit) for the block; nothing when limit is None. Not ``armed``: the peak is
    watched from the start, the limit enforced once arm() is called (after the door's check)."""
    if limit is None:
        yield None
        return
    with MemoryLimit(limit, armed=armed) as watch:
        yield watch
