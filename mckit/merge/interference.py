"""Interference between task vectors, per layer and per pair of modalities (METHODS.md 3).

For two task vectors a, b (the entries of one layer's seven linears, flattened):

- L2 distance        ||a - b||_2
- cosine             <a, b> / (||a|| ||b||)
- sign-conflict rate fraction of entries, among those where both are non-zero,
                     whose signs differ
- SSD                1 - mean_p |a_p + b_p| / (|a_p| + |b_p|)   (soft sign dissimilarity;
                     0 = always the same sign, 1 = always cancelling), over entries
                     where |a_p| + |b_p| > 0
"""

from __future__ import annotations

import itertools
import re

import pandas as pd
import torch

LAYER = re.compile(r"layers\.(\d+)\.")


def pair_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The four interference metrics of two flattened task vectors (float32)."""
    a, b = a.float().flatten(), b.float().flatten()
    both = (a != 0) & (b != 0)
    denom = a.abs() + b.abs()
    live = denom > 0
    return {
        "L2": float((a - b).norm()),
        "cosine": float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30)),
        "sign_conflict": float((torch.sign(a[both]) != torch.sign(b[both])).float().mean()) if both.any() else 0.0,
        "SSD": float(1 - ((a + b).abs()[live] / denom[live]).mean()) if live.any() else 0.0,
    }


def by_layer(tau: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """One flat vector per decoder layer: its linears' entries concatenated in name order."""
    groups: dict[int, list[torch.Tensor]] = {}
    for name in sorted(tau):
        m = LAYER.search(name)
        if m:
            groups.setdefault(int(m.group(1)), []).append(tau[name].float().flatten())
    return {layer: torch.cat(parts) for layer, parts in sorted(groups.items())}


def interference_table(taus: dict[str, dict[str, torch.Tensor]]) -> pd.DataFrame:
    """Every metric, layer and modality pair: columns layer, a, b, metric, value (both orders, a != b)."""
    flat = {m: by_layer(t) for m, t in taus.items()}
    layers = sorted(set.intersection(*(set(f) for f in flat.values())))
    rows = []
    for a, b in itertools.combinations(taus, 2):
        for layer in layers:
            for metric, value in pair_metrics(flat[a][layer], flat[b][layer]).items():
                rows += [{"layer": layer, "a": a, "b": b, "metric": metric, "value": value},
                         {"layer": layer, "a": b, "b": a, "metric": metric, "value": value}]
    return pd.DataFrame(rows)


def interference_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Each metric's mean over layers, modality x modality (rows metric, a; columns b)."""
    return table.groupby(["metric", "a", "b"])["value"].mean().unstack("b")
