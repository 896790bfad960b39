"""Evaluation on the five image capability tasks (exact match of the generated word)."""

from __future__ import annotations

import numpy as np
import torch

from mckit.eval.protocols import EXACT, exact_match_by_task
from mckit.models.batch import Batch
from mckit.models.mllm import MLLM
from mckit.world.capabilities import TASKS, CapabilityItem, capability_items
from mckit.world.entities import World
from mckit.world.tasks import chat


def capability_batch(model: MLLM, items: list[CapabilityItem], text: list, with_answers: bool = True) -> Batch:
    """A batch of capability items (raw images) and text examples."""
    prompts = [chat(it.prompt) for it in items] + [chat(ex.prompt) for ex in text]
    inputs = [{"image": [it.image]} for it in items] + [{} for _ in text]
    answers = [it.answer for it in items] + [ex.answer for ex in text] if with_answers else None
    return model.batch(prompts, inputs, answers)


@torch.no_grad()
def capability_answers(model: MLLM, items: list[CapabilityItem], batch_size: int = 128) -> list[str]:
    """Greedy answers (``generate``, up to 4 new tokens) to capability items."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        out += model.generate(capability_batch(model, items[i:i + batch_size], [], with_answers=False), 4)
    return out


def evaluate_capabilities(model: MLLM, items: list[CapabilityItem]) -> dict[str, dict]:
    """Exact-match accuracy per task ``{task: {"acc", "ci95", "n", "protocol"}}`` plus ``"mean"`` over tasks."""
    out = exact_match_by_task(capability_answers(model, items), items)
    out["mean"] = {"acc": float(np.mean([r["acc"] for r in out.values()])), "n": sum(r["n"] for r in out.values()),
                   "protocol": EXACT}
    return out


def eval_items(world: World, part: str, n: int, seed: int = 0) -> list[CapabilityItem]:
    """``n`` items per task of ``part`` (val | test), all five tasks."""
    return [it for task in TASKS for it in capability_items(world, task, n, part, seed)]
