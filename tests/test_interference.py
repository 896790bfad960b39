"""Interference metrics on hand-checked vectors."""

import pytest
import torch

from mckit.merge.interference import by_layer, interference_table, pair_metrics


def test_identical_and_opposite():
    a = torch.tensor([1.0, -2.0, 0.5, 0.0])
    same = pair_metrics(a, a)
    assert same == pytest.approx({"L2": 0.0, "cosine": 1.0, "sign_conflict": 0.0, "SSD": 0.0})
    opp = pair_metrics(a, -a)
    assert opp == pytest.approx({"L2": float(2 * a.norm()), "cosine": -1.0, "sign_conflict": 1.0, "SSD": 1.0})


def test_hand_case():
    a = torch.tensor([1.0, 1.0, 0.0, 2.0])
    b = torch.tensor([1.0, -3.0, 4.0, 0.0])
    m = pair_metrics(a, b)
    # both non-zero at entries 0, 1: one conflict in two
    assert m["sign_conflict"] == pytest.approx(0.5)
    # |a+b|/(|a|+|b|): 2/2, 2/4, 4/4, 2/2 -> mean 0.875
    assert m["SSD"] == pytest.approx(0.125)
    assert m["cosine"] == pytest.approx((1 - 3) / (a.norm() * b.norm()).item())
    assert m["L2"] == pytest.approx(float((a - b).norm()))


def test_table_is_per_layer_and_symmetric():
    g = torch.Generator().manual_seed(0)
    taus = {m: {f"model.layers.{l}.mlp.up_proj.weight": torch.randn(3, 4, generator=g) for l in range(2)}
            for m in ("image", "audio", "video")}
    assert set(by_layer(taus["image"])) == {0, 1}
    t = interference_table(taus)
    assert len(t) == 3 * 2 * 2 * 4  # pairs x orders x layers x metrics
    pivot = t.pivot_table(index=["layer", "metric", "a"], columns="b", values="value")
    assert (pivot.loc[(0, "cosine", "image"), "audio"] == pivot.loc[(0, "cosine", "audio"), "image"])
