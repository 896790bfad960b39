"""Evaluation: greedy answers scored by exact match, with n and a 95% Wilson interval."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from .mllm import MLLM
from .tasks import Example
from .train import FeatureBank, to_batch


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (robust near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def predict(model: MLLM, examples: list[Example], banks: dict[str, FeatureBank], seed: int = 0,
            batch_size: int = 128, desc: str = "evaluating") -> list[str]:
    """Greedy answers to ``examples`` (features drawn from ``banks`` with ``seed``)."""
    rng = np.random.default_rng([seed, 41])
    out: list[str] = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        chunk = examples[i:i + batch_size]
        out += model.generate(to_batch(model, chunk, banks, rng, with_answers=False))
    return out


def score(examples: list[Example], predictions: list[str]) -> dict[str, dict]:
    """Exact-match accuracy per task: ``{task: {"acc", "ci95", "n"}}``."""
    hits: dict[str, list[int]] = defaultdict(list)
    for ex, pred in zip(examples, predictions):
        hits[ex.task.split(":")[0]].append(int(pred == ex.answer))
    return {t: {"acc": float(np.mean(h)), "ci95": list(wilson(sum(h), len(h))), "n": len(h)} for t, h in hits.items()}
