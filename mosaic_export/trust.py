"""Can measurements on this machine be trusted? Repeated runs and their spread, figures that
contradict each other (a narrower model measured slower), and a machine busy with other work
(other processes' share of the CPU time, the hypervisor's steal). Used by profile detect."""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

AGREE = 0.05  # the two fastest decode figures agree within this fraction of the faster

# Trust checks. A narrower model may measure at most MONOTONE_TOLERANCE slower than a wider one
# (run-to-run noise: its weights are fewer, so it is faster); the two fastest runs of a width (the
# figure fitted is the fastest) may differ by at most MAX_GAP. The spread of all runs is reported,
# not judged: one run slowed by a burst of other work (seen here on an idle machine: 139, 139,
# 117 tokens/s) does not make the fastest figure wrong.
MONOTONE_TOLERANCE = 0.05
MAX_GAP = 0.10
# Busy machine: other processes' share of the machine's CPU time (/proc/stat less this process
# and its runtimes) over QUIET_S before measuring and over the whole measurement, the
# hypervisor's steal share; where /proc/stat is missing, the 1-minute load average less this
# process, per CPU.
MAX_OTHERS = 0.25
MAX_STEAL = 0.05
MAX_LOAD_PER_CORE = 0.5


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeated figures: (max - min) / median; 0 for fewer than two."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / statistics.median(values)


def top_gap(values: Sequence[float]) -> float:
    """How far apart the two largest figures are, as a fraction of the larger; 0 for fewer than
    two."""
    if len(values) < 2:
        return 0.0
    first, second = sorted(values, reverse=True)[:2]
    return (first - second) / first


def settled(values: Sequence[float]) -> bool:
    """Whether there are two figures and the two largest agree within AGREE of the larger."""
    return len(values) >= 2 and top_gap(values) <= AGREE


@dataclass(frozen=True)
class WidthRuns:
    """Repeated runs of one stand-in size: decode and prefill tokens/s of each run."""

    width: float
    decode: tuple[float, ...]
    prefill: tuple[float, ...]


def sanity_problems(runs: Sequence[WidthRuns], label: str = "") -> list[str]:
    """What makes these figures implausible: a narrower model measured slower than a wider one
    (fastest against fastest, beyond MONOTONE_TOLERANCE), or a width whose two fastest runs differ
    by more than MAX_GAP; decode and prefill alike. Empty when they are plausible."""
    prefix = f"{label} " if label else ""
    problems = []
    ordered = sorted(runs, key=lambda r: -r.width)
    for metric in ("decode", "prefill"):
        for i, narrow in enumerate(ordered):
            for wide in ordered[:i]:
                slow, fast = max(getattr(narrow, metric)), max(getattr(wide, metric))
                if narrow.width < wide.width and slow < fast * (1 - MONOTONE_TOLERANCE):
                    problems.append(
                        f"{prefix}{metric} at width {width_text(narrow.width)} ({rate_text(slow)} "
                        f"tokens/s) is slower than at width {width_text(wide.width)} ({rate_text(fast)} "
                        "tokens/s): a narrower model cannot be slower")
        for r in ordered:
            values = getattr(r, metric)
            if top_gap(values) > MAX_GAP:
                problems.append(
                    f"{prefix}{metric} at width {width_text(r.width)}: the two fastest runs differ by "
                    f"{top_gap(values):.0%} ({', '.join(map(rate_text, values))} tokens/s; "
                    f"limit {MAX_GAP:.0%})")
    return problems


def rate_text(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def width_text(w: float) -> str:
    return f"{w:.1f}" if w == round(w, 1) else f"{w:g}"


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time in clock ticks: the machine's (all CPUs) and this process's."""

    total: float  # user + nice + system + idle + iowait + irq + softirq + steal
    busy: float  # user + nice + system + irq + softirq
    steal: float  # taken by the hypervisor for other virtual machines
    own: float  # this process and its finished children (the runtimes' benchmark processes)


def parse_cpu_line(line: str) -> tuple[float, float, float]:
    """(total, busy, steal) ticks from /proc/stat's ``cpu`` line; steal is its 8th figure (0 on
    kernels without it). Guest time is already counted in user and nice."""
    f = ([float(x) for x in line.split()[1:9]] + [0.0] * 8)[:8]
    user, nice, system, idle, iowait, irq, softirq, steal = f
    return sum(f), user + nice + system + irq + softirq, steal


def read_cpu_times(stat: str = "/proc/stat") -> CpuTimes | None:
    """The machine's and this process's CPU times now; None where there is no /proc/stat."""
    try:
        with open(stat) as fh:
            line = fh.readline()
    except OSError:
        return None
    if not line.startswith("cpu "):
        return None
    total, busy, steal = parse_cpu_line(line)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    own = sum(u.ru_utime + u.ru_stime for u in usage)
    return CpuTimes(total, busy, steal, own * os.sysconf("SC_CLK_TCK"))


def cpu_shares(before: CpuTimes, after: CpuTimes) -> tuple[float, float]:
    """Other processes' share of the machine's CPU time between two readings (this process and
    its runtimes left out), and the hypervisor's steal share."""
    total = after.total - before.total
    if total <= 0:
        return 0.0, 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(1.0, max(0.0, others / total)), max(0.0, (after.steal - before.steal) / total)


def busy_reasons(when: str, others: float | None, steal: float | None, load1: float | None = None,
                 cpus: int | None = None) -> list[str]:
    """Why the machine was too busy ``when`` ("while measuring") to trust a measurement: other
    processes' CPU share over MAX_OTHERS, steal over MAX_STEAL; where the CPU shares are unknown
    (None), the 1-minute load average less this process over MAX_LOAD_PER_CORE per CPU."""
    load = f"; 1-minute load average {load1:.2f} on {cpus} CPUs" if load1 is not None and cpus else ""
    reasons = []
    if others is not None and others > MAX_OTHERS:
        reasons.append(f"other processes took {others:.0%} of the CPU time {when} "
                       f"(limit {MAX_OTHERS:.0%}{load})")
    if others is None and load1 is not None and cpus and (load1 - 1) / cpus > MAX_LOAD_PER_CORE:
        reasons.append(f"the machine was busy {when}: 1-minute load average {load1:.2f} on {cpus} "
                       f"CPUs (limit {MAX_LOAD_PER_CORE:g} per CPU besides this process)")
    if steal is not None and steal > MAX_STEAL:
        reasons.append(f"the hypervisor took {steal:.0%} of the CPU time {when} (steal; limit "
                       f"{MAX_STEAL:.0%}): other virtual machines share these CPUs")
    return reasons


def machine_check(when: str, before: CpuTimes | None, after: CpuTimes | None) -> list[str]:
    """busy_reasons between two readings, with the load average now."""
    shares = cpu_shares(before, after) if before is not None and after is not None else (None, None)
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return busy_reasons(when, *shares, load1, os.cpu_count())
