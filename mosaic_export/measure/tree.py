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

from ..errors import UserError
from ..units import format_bytes

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
    """Memory cgroups for children, where this process may make them (v1 or v2); else none."""

    def __init__(self):
        self.base, self.limit_file = _cgroup_base()
        self.made: list[Path] = []

    def confine(self, pid: int, limit: int) -> bool:
        """Put the process into a new cgroup limited to ``limit`` bytes; False where not possible."""
        if self.base is None:
            return False
        group = self.base / f"mosaic-{os.getpid()}-{pid}"
        try:
            group.mkdir()
            self.made.append(group)
            (group / self.limit_file).write_text(str(max(limit, 1 << 20)))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            return False
        return True

    def oom_killed(self, pid: int) -> bool:
        """Whether the kernel killed something in the child's cgroup for memory."""
        if self.base is None:
            return False
        group = self.base / f"mosaic-{os.getpid()}-{pid}"
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            with contextlib.suppress(OSError, ValueError):
                for line in (group / name).read_text().splitlines():
                    if line.startswith(key + " ") and int(line.split()[1]) > 0:
                        return True
        return False

    def remove(self) -> None:
        for group in self.made:
            with contextlib.suppress(OSError):
                group.rmdir()
        self.made.clear()


def _cgroup_base() -> tuple[Path | None, str]:
    """This process's memory cgroup folder, if it may make groups under it: (folder, the limit
    file's name), or (None, "")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            candidates = [(Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes")]
        elif controllers == "":  # v2: the memory controller must be delegated to the children
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            with contextlib.suppress(OSError):
                if "memory" in (folder / "cgroup.subtree_control").read_text().split():
                    candidates = [(folder, "memory.max")]
                else:
                    continue
        else:
            continue
        for folder, limit_file in candidates:
            if (folder / limit_file).exists() and os.access(folder, os.W_OK):
                return folder, limit_file
    return None, ""


class MemoryLimit:
    """Hold this process and its children to ``limit`` bytes together while the block runs (see
    the module's docstring); ``peak`` is the largest sum seen. Install from the main thread."""

    def __init__(self, limit: int, poll_s: float = POLL_S, use_cgroups: bool = True, armed: bool = True):
        self.limit, self.poll_s = limit, poll_s
        self.armed = armed  # enforced (else the peak is only watched, until arm())
        self.peak, self.peak_each = 0, {}
        self.exceeded: str | None = None  # the message, once over the limit
        self._cgroups = _Cgroups() if use_cgroups else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = None

    def arm(self) -> None:
        """Enforce the limit from now on (a run arms it once its estimate passed the door)."""
        self.armed = True
        self._sample()

    def child_limit(self) -> int:
        """What a child may hold: the limit less this process's resident set now."""
        return self.limit - rss_bytes(os.getpid())

    def adopt(self, pid: int) -> bool:
        """A child just started: confine it to child_limit() where cgroups allow (True if so)."""
        return self._cgroups is not None and self._cgroups.confine(pid, self.child_limit())

    def killed(self, pid: int) -> bool:
        """Whether a child that died by a signal was stopped for memory (by the watch or its cgroup)."""
        if self._cgroups is not None and self._cgroups.oom_killed(pid):
            if self.exceeded is None:
                self.exceeded = (f"a runtime process went over the {format_bytes(self.child_limit())} "
                                 f"that --max-rss {format_bytes(self.limit)} leaves it beside this process")
            return True
        return self.exceeded is not None

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
            if self._previous is not None:  # the main thread stops at its next instruction
                signal.pthread_kill(threading.main_thread().ident, LIMIT_SIGNAL)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._sample()

    def _on_signal(self, signum, frame):
        if self.exceeded is not None:
            raise self.error()

    def __enter__(self) -> MemoryLimit:
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():  # else: children stopped, no signal
            self._previous = signal.signal(LIMIT_SIGNAL, self._on_signal)
        self._sample()
        self._thread = threading.Thread(target=self._watch, name="max-rss watch", daemon=True)
        self._thread.start()
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._previous is not None:
            signal.signal(LIMIT_SIGNAL, self._previous)
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
