"""Single-modality evaluation: held-out items of every task a modality's model was trained on."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mckit.eval.protocols import predict, score
from mckit.models.mllm import MLLM
from mckit.models.training import FeatureBank
from mckit.world.entities import MODALITIES, World
from mckit.world.render import TEST_RENDER_SEED, render_bank
from mckit.world.tasks import MODALITY_TASKS, Slots


def evaluate_model(model: MLLM, world: World, modality: str, n: int = 200, seed: int = 0) -> pd.DataFrame:
    """Held-out single-modality accuracy of ``model`` on fresh renders: task, acc, ci95, n, chance."""
    bank = FeatureBank(model.branches[modality], render_bank(modality, world, 8, TEST_RENDER_SEED + 100 * seed))
    result = evaluate_single(model, world, modality, bank, n, seed)
    return pd.DataFrame([{"task": t, **r} for t, r in result.items()])


CHANCE = {"identify": 1 / 32, "attribute": 1 / 4, "choice": 1 / 4, "describe": 1 / 4, "level": 1 / 2, "common": 1 / 4}


def single_task_examples(world: World, modality: str, n: int, seed: int) -> list:
    """``n`` held-out single-modality items, an equal share per task (identify, attribute, ...)."""
    rng = np.random.default_rng([seed, MODALITIES.index(modality), 51])
    tasks = list(MODALITY_TASKS)
    return [MODALITY_TASKS[tasks[i % len(tasks)]](world, rng, Slots(modality, rng)) for i in range(n)]


def evaluate_single(model: MLLM, world: World, modality: str, bank: FeatureBank, n: int, seed: int) -> dict:
    examples = single_task_examples(world, modality, n, seed)
    result = score(examples, predict(model, examples, {modality: bank}, seed=seed, desc=f"eval {modality}"))
    for task, r in result.items():
        r["chance"] = CHANCE[task]
    return result
