"""What the notebooks call between the kit's layers: run modes, memory, one exchange, example tables."""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mckit.models.mllm import MLLM
from mckit.world.entities import MODALITIES, World
from mckit.world.render import render
from mckit.world.tasks import MODALITY_TASKS, TEXT_TASKS, Slots, chat


def ask(model: MLLM, world: World, modality: str, entity: str, question: str, level: str = "high",
        seed: int = 0) -> dict:
    """Render ``entity`` in ``modality``, ask ``question`` about it, and return the exchange."""
    x = render(modality, world, world.by_name(entity), level, np.random.default_rng(seed))
    prompt = chat(f"{modality} : <{modality}> {question}")
    return {"input": x, "prompt": prompt, "answer": model.answer([prompt], [{modality: [x]}])[0],
            "entity": world.by_name(entity).attrs | {"name": entity, "level": level}}


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


def resolve_mode(mode: str) -> str:
    """Notebook ``MODE``: "auto" means "full" on a GPU and "smoke" (toy scale) on a CPU.

    Also sets torch's CPU threads to :func:`usable_cpus` (a container's quota, not the host's cores).
    """
    torch.set_num_threads(usable_cpus())
    if mode not in ("auto", "smoke", "full"):
        raise ValueError(f"MODE must be 'auto', 'smoke' or 'full', got {mode!r}")
    if mode == "auto":
        return "full" if torch.cuda.is_available() else "smoke"
    return mode


def example_prompts(world: World, seed: int = 0) -> pd.DataFrame:
    """One generated item per task and modality (and text): what the models are trained on."""
    rng = np.random.default_rng(seed)
    rows = [{"modality": "text", "task": t, **_item(f(world, rng, Slots(None, rng)))} for t, f in TEXT_TASKS.items()]
    for mod in MODALITIES:
        rows += [{"modality": mod, "task": t, **_item(f(world, rng, Slots(mod, rng)))}
                 for t, f in MODALITY_TASKS.items()]
    return pd.DataFrame(rows)


def _item(ex) -> dict:
    return {"prompt": ex.prompt, "answer": ex.answer}


def attribute_counts(world: World) -> pd.DataFrame:
    """How many entities hold each value, per family (rows: value rank, columns: family)."""
    df = pd.DataFrame([e.attrs for e in world.entities])
    return pd.DataFrame({f: df[f].value_counts().sort_index().to_numpy() for f in df.columns})


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Binder's limit is about 2 GB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)
