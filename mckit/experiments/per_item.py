"""One MCUB item, or a few, through several systems: what each model sees and answers, side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mckit.eval.mcub import MCUBItem, one_entity_oracle
from mckit.eval.protocols import OPTION_SCORE, PROTOCOLS, evaluate_items, first_token_answers, generated_answers
from mckit.models.mllm import MLLM
from mckit.world.entities import World


def answer_item(model: MLLM, item: MCUBItem) -> dict[str, str]:
    """One item through ``model``: the prompt it sees, its generated reply, and every protocol's letter."""
    from mckit.eval.protocols import item_inputs, named_letter, option_score_answers

    prompt = item_inputs(model, [item])[0][0]
    generated = generated_answers(model, [item])[0]
    return {"sees": prompt, "generated": generated, "letter": first_token_answers(model, [item])[0][:1],
            "named_letter": named_letter(generated),
            "option_score": option_score_answers(model, [item])[0],
            "gold": item.answer}


def item_media(item: MCUBItem) -> dict[str, list[np.ndarray]]:
    """The raw inputs of one item, for drawing."""
    from mckit.eval.mcub import load_media

    return {m: [load_media(p) for p in paths] for m, paths in item.media.items()}


def answer_table(models: dict[str, MLLM], item: MCUBItem) -> pd.DataFrame:
    """One item through every model of ``models`` (name -> model): rows as :func:`answer_item`."""
    return pd.DataFrame({name: answer_item(model, item) for name, model in models.items()}).T


def score_table(models: dict[str, MLLM], items: list[MCUBItem],
                protocols: tuple[str, ...] = PROTOCOLS) -> pd.DataFrame:
    """Accuracy of every model (rows) under every protocol (columns) on ``items``."""
    return pd.DataFrame({name: {p: evaluate_items(m, items, p)["acc"] for p in protocols}
                         for name, m in models.items()}).T


def single_vs_oracle(scores: pd.DataFrame, world: World, split: str, n: int, protocol: str = OPTION_SCORE) -> dict:
    """The best single model against the one-entity oracle (a single input's ceiling), and NaiveMC's gain over it."""
    singles = scores.loc[[s for s in scores.index if s.startswith("single:")], protocol]
    oracle = one_entity_oracle(world, split, n)
    return {"one_entity_oracle": round(oracle, 3), "best_single": round(float(singles.max()), 3),
            "naivemc_minus_best_single": round(float(scores.loc["naivemc", protocol] - singles.max()), 3)}
