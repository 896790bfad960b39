"""How many CPUs this process may really use: its affinity's idle CPUs, capped by a container's quota."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


def quota_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """A container's CPU quota (cgroup v2 or v1), rounded up to whole CPUs; None when there is none."""
    for quota_file, period_file in ((cgroup / "cpu.max", None),
                                    (cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else period_file.read_text().strip())
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1"):
            return max(1, math.ceil(int(quota) / int(period)))
    return None


def cpu_times(stat: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) clock ticks since boot, from ``/proc/stat``; empty where it cannot be read."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, *ticks = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and len(ticks) >= 5:
            values = [int(t) for t in ticks[:8]]
            idle = values[3] + values[4]                    # idle + iowait
            out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def idle_cpus(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]
              ) -> float | None:
    """How many of ``cpus`` were idle between two :func:`cpu_times` readings (None when nothing was measured)."""
    idle, seen = 0.0, False
    for cpu in cpus & before.keys() & after.keys():
        busy, total = (a - b for a, b in zip(after[cpu], before[cpu]))
        if total > 0:
            idle, seen = idle + 1 - busy / total, True
    return idle if seen else None


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup"), stat: Path = Path("/proc/stat"),
                interval: float = 0.25) -> int:
    """CPUs this process may really use now: those of its affinity that are idle, capped by a container's quota.

    On Binder the host may have 16+ cores and the container a quota of 1; on a 2-core
    machine another process may keep one core busy. Either way torch's default (every
    core) runs threads that wait for one another: with another process busy on one of
    two cores, notebook 02 took 83 s on 2 threads against 16 s on 1 (13 s idle). Idle
    CPUs are measured once, over ``interval`` seconds, from ``/proc/stat`` (where it
    exists; elsewhere every CPU of the affinity counts).
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    usable = len(cpus)
    before = cpu_times(stat)
    if before:
        time.sleep(interval)
        idle = idle_cpus(before, cpu_times(stat), set(cpus))
        if idle is not None:
            usable = min(usable, max(1, round(idle)))
    quota = quota_cpus(cgroup)
    return max(1, min(usable, quota) if quota else usable)
