"""What the notebooks call between the kit's layers: run modes, memory, one exchange, example tables."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pandas as pd
import torch

from mckit.models.mllm import MLLM
from mckit.storage.cpus import usable_cpus
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


def resolve_mode(mode: str) -> str:
    """Notebook ``MODE``: "auto" means "full" on a GPU and "smoke" (toy scale) on a CPU.

    Also sets torch's CPU threads to :func:`usable_cpus` (the idle CPUs this process may use, capped by a
    container's quota; not the host's cores).
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
