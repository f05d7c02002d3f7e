"""Is this machine busy? Other processes' share of the CPU time and the hypervisor's steal,
read from /proc/stat around a measurement. profile detect warns when they were high: its
intervals are then wider for it (measure/rounds.py), not wrong."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

# Busy machine: other processes' share of the machine's CPU time (/proc/stat less this process
# and its runtimes) before measuring and over the whole measurement, the hypervisor's steal
# share; where /proc/stat is missing, the 1-minute load average less this process, per CPU.
MAX_OTHERS = 0.25
MAX_STEAL = 0.05
MAX_LOAD_PER_CORE = 0.5


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
    """Why the machine was busy ``when`` ("while measuring"): other processes' CPU share over
    MAX_OTHERS, steal over MAX_STEAL; where the CPU shares are unknown (None), the 1-minute load
    average less this process over MAX_LOAD_PER_CORE per CPU. Each reason says that the
    intervals are wider for it."""
    load = f"; 1-minute load average {load1:.2f} on {cpus} CPUs" if load1 is not None and cpus else ""
    reasons = []
    if others is not None and others > MAX_OTHERS:
        reasons.append(f"other processes took {others:.0%} of the CPU time {when} "
                       f"(over {MAX_OTHERS:.0%}{load}): the intervals are wider for it")
    if others is None and load1 is not None and cpus and (load1 - 1) / cpus > MAX_LOAD_PER_CORE:
        reasons.append(f"the machine was busy {when}: 1-minute load average {load1:.2f} on {cpus} "
                       f"CPUs (over {MAX_LOAD_PER_CORE:g} per CPU besides this process): the intervals "
                       "are wider for it")
    if steal is not None and steal > MAX_STEAL:
        reasons.append(f"the hypervisor took {steal:.0%} of the CPU time {when} (steal, over "
                       f"{MAX_STEAL:.0%}): other virtual machines share these CPUs, and the intervals "
                       "are wider for it")
    return reasons


def machine_check(when: str, before: CpuTimes | None, after: CpuTimes | None) -> list[str]:
    """busy_reasons between two readings, with the load average now."""
    shares = cpu_shares(before, after) if before is not None and after is not None else (None, None)
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return busy_reasons(when, *shares, load1, os.cpu_count())
