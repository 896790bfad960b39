"""Stages of a resumable build (:class:`mckit.storage.stages.Stages`) as the build commands run them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from mckit.models.checkpoints import load_mllm
from mckit.models.mllm import MLLM, Branch, toy_branch
from mckit.storage.stages import Stages


def run_stage(stages: Stages, name: str, work: Callable[[Path], dict], record: dict, label: str | None = None) -> None:
    """Run ``work(path) -> record entries`` as stage ``name`` unless it finished in an earlier run; either way
    merge its entries and seconds (under ``label``) into ``record`` and leave torch's random state where the
    stage left it, so a resumed build continues exactly as an uninterrupted one."""
    done = stages.done(name)
    if done is None:
        start = time.perf_counter()
        with stages.run(name) as path:
            entries = work(path)
        done = {"entries": entries, "seconds": round(time.perf_counter() - start, 1),
                "rng": torch.get_rng_state().tolist()}
        stages.finish(name, done)
    for key, value in done["entries"].items():
        record[key] = {**record[key], **value} if isinstance(record.get(key), dict) else value
    record["seconds"][label or name.removeprefix("models/")] = done["seconds"]
    torch.set_rng_state(torch.tensor(done["rng"], dtype=torch.uint8))


def load_stage(stages: Stages, name: str) -> MLLM:
    """A finished stage's MLLM, loaded without touching torch's random state."""
    with torch.random.fork_rng():
        return load_mllm(stages.path(name))


def load_branch(path: Path, modality: str, hidden: int) -> Branch:
    """The branch an encoder stage saved as ``branch.safetensors``, its encoder frozen, built without touching
    torch's random state."""
    with torch.random.fork_rng():
        branch = toy_branch(modality, hidden)
    branch.load_state_dict(load_file(str(path / "branch.safetensors")))
    branch.encoder.eval().requires_grad_(False)
    return branch
