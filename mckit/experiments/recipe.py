"""Did the experts' recipe give what merging needs? Their task vectors' geometry, and the targets.

Merging adds task vectors; it can only keep each expert's gain if the experts moved the weights
little and the others leave its task alone. :func:`expert_geometry` measures how far and how alike;
:func:`recipe_targets` checks a capability table against what the benchmark needs to teach anything
(each expert gains on its task, merging recovers part of the multi-task model's gain).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from mckit.eval.protocols import wilson
from mckit.merge.task_vectors import task_vector
from mckit.models.shipped import MULTITASK, load_expert
from mckit.world.capabilities import TASKS


def expert_geometry(regime: str, experts_dir: str | Path | None = None) -> dict:
    """How far the experts moved and how alike their moves are, over the task vectors' weights.

    ``rel_norm[name]`` = ||tau|| / ||theta_0|| for each expert and the multi-task model (theta_0
    restricted to the weights tau covers: the LLM's seven linears per layer, shapes (out, in));
    ``cosine[a][b]`` = <tau_a, tau_b> / (||tau_a|| ||tau_b||) for every pair of experts, and
    ``cos_sum_multitask`` = cos(sum_i tau_i, tau_multitask).
    """
    base = load_expert("base", regime, experts_dir)
    names = [*TASKS, MULTITASK]
    taus = {n: task_vector(load_expert(n, regime, experts_dir), base.llm) for n in names}
    keys = sorted(taus[TASKS[0]])
    ref = base.llm.state_dict()
    theta_norm = torch.sqrt(sum(ref[k].float().pow(2).sum() for k in keys))
    flat = {n: torch.cat([taus[n][k].flatten() for k in keys]).double() for n in names}
    cosine = {a: {b: float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)) for b in TASKS}
              for a in TASKS}
    summed = torch.stack([flat[t] for t in TASKS]).sum(0)
    return {"rel_norm": {n: float(flat[n].norm() / theta_norm) for n in names}, "cosine": cosine,
            "cos_sum_multitask": float(torch.nn.functional.cosine_similarity(summed, flat[MULTITASK], dim=0))}


def recipe_targets(table: dict[str, dict]) -> pd.DataFrame:
    """What the experts' recipe must give (one regime's :func:`capability_table`), as measured on test items.

    Rows: each expert's own-task gain over the base (>= 10 points); the multi-task model's gain on
    the five-task mean (>= 8); task arithmetic's validation score at lambda 1.0 over its best
    (>= 0.9); the best merge's gain (>= 3 points, its 95% interval above the base's mean) and its
    share of the multi-task model's gain (>= 0.5). The best merge is chosen on validation (the score
    at its chosen lambda, among methods with one), never on test.
    """
    mean = {name: row["test"]["mean"] for name, row in table.items()}
    base = mean["base"]["acc"]
    rows = [{"criterion": f"expert {t}: own task - base (points)",
             "value": 100 * (table[f"expert:{t}"]["test"][t]["acc"] - table["base"]["test"][t]["acc"]), "target": 10}
            for t in TASKS]
    gain_mt = mean[MULTITASK]["acc"] - base
    rows.append({"criterion": "multitask: mean - base (points)", "value": 100 * gain_mt, "target": 8})
    if "task_arithmetic" in table:
        ta = table["task_arithmetic"]["val"]
        rows.append({"criterion": "task arithmetic: val at lambda 1.0 / best val",
                     "value": ta["1.0"] / max(ta.values()), "target": 0.9})
    merged = {n: r["val"][str(r["lam"])] for n, r in table.items() if r.get("val")}
    if merged:
        rows += _best_merge_rows(mean, max(merged, key=merged.get), base, gain_mt)
    frame = pd.DataFrame(rows)
    frame["met"] = frame["value"] >= frame["target"]
    frame.loc[frame["criterion"].str.contains("CI low"), "met"] = frame["value"] > 0       # strictly above
    return frame


def _best_merge_rows(mean: dict[str, dict], best: str, base: float, gain_mt: float) -> list[dict]:
    """The best merge's gain over the base, its 95% interval's low end over the base, its share of the
    multi-task gain."""
    low = wilson(round(mean[best]["acc"] * mean[best]["n"]), mean[best]["n"])[0]
    return [{"criterion": f"best merge ({best}): mean - base (points)", "value": 100 * (mean[best]["acc"] - base),
             "target": 3},
            {"criterion": f"best merge ({best}): 95% CI low - base (points)", "value": 100 * (low - base), "target": 0},
            {"criterion": f"best merge ({best}): share of the multi-task gain",
             "value": (mean[best]["acc"] - base) / gain_mt if gain_mt > 0 else float("nan"), "target": 0.5}]


def geometry_summary(geometry: dict[str, dict]) -> pd.DataFrame:
    """Per regime: ||tau|| / ||theta_0|| of each model, the range of the experts' pairwise cosines, and
    cos(sum of the experts' task vectors, the multi-task model's)."""
    rows = {}
    for regime, g in geometry.items():
        pairs = [g["cosine"][a][b] for i, a in enumerate(TASKS) for b in TASKS[i + 1:]]
        rows[regime] = {**{f"norm:{m}": v for m, v in g["rel_norm"].items()}, "cosine_min": min(pairs),
                        "cosine_max": max(pairs), "cos_sum_multitask": g["cos_sum_multitask"]}
    return pd.DataFrame(rows)


def targets_table(tables: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """:func:`recipe_targets` of every regime's table, one block of rows per regime."""
    return pd.concat({regime: recipe_targets(table) for regime, table in tables.items()}, names=["regime", "row"])
