"""Single-modality evaluation: held-out items of every task a modality's model was trained on."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mckit.eval.protocols import predict, score, wilson
from mckit.models.mllm import MLLM
from mckit.models.training import FeatureBank
from mckit.world.entities import MODALITIES, World
from mckit.world.render import TEST_RENDER_SEED, render_bank
from mckit.world.tasks import LETTERS, MODALITY_TASKS, Slots, commonality, drill, reply_letter


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


def binding_examples(world: World, n: int, seed: int) -> dict[str, list]:
    """Held-out text items that show letter binding: ``letter`` and ``word`` commonality (test
    combinations, gold letters balanced) and ``drill`` (held-out option lists), ``n`` each."""
    rng = np.random.default_rng([seed, 57])
    return {
        "letter": [commonality(world, rng, Slots(None, rng), answer="letter", split="test", gold_at=i % len(LETTERS))
                   for i in range(n)],
        "word": [commonality(world, rng, Slots(None, rng), answer="word", split="test", gold_at=i % len(LETTERS))
                 for i in range(n)],
        "drill": [drill(world, rng, Slots(None, rng), split="test") for _ in range(n)],
    }


def drill_correct(prompt: str, reply: str) -> bool:
    """Every option of a drill prompt named once, each followed by its own letter."""
    options = dict(zip(prompt.split()[3:16:4], LETTERS))          # "( A ) red ( B ) big ..." -> {red: A, ...}
    pairs = [p.split() for p in reply.split(",")]
    if any(len(p) != 2 for p in pairs):
        return False
    return sorted(w for w, _ in pairs) == sorted(options) and all(options[w] == letter for w, letter in pairs)


def evaluate_binding(model: MLLM, world: World, n: int = 400, seed: int = 0) -> dict:
    """Held-out letter binding of a text LM: {"letter", "word", "drill"} -> {"acc", "ci95", "n"}.

    ``letter``: the letter named in the reply equals the gold one; ``word``: exact match;
    ``drill``: :func:`drill_correct`.
    """
    sets = binding_examples(world, n, seed)
    rule = {"letter": lambda ex, p: reply_letter(p) == reply_letter(ex.answer),
            "word": lambda ex, p: p == ex.answer,
            "drill": lambda ex, p: drill_correct(ex.prompt, p)}
    out = {}
    for name, examples in sets.items():
        hits = [rule[name](ex, p) for ex, p in zip(examples, predict(model, examples, {}, seed=seed, desc=name))]
        out[name] = {"acc": float(np.mean(hits)), "ci95": list(wilson(sum(hits), len(hits))), "n": len(hits)}
    return out
