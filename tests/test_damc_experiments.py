"""DAMC's coefficient choice: coordinate ascent on validation, and the fallback from single-modality scores."""

import json

import pytest

import mckit.experiments.damc as D


class _Systems:
    """Builds nothing: hands back the lambdas, which the patched scorer reads."""

    def build(self, name, modalities, lam=None):
        assert name == "damc_tuned"
        return tuple(lam)


def test_tuning_finds_each_modalitys_best_lambda_on_a_separable_score(monkeypatch):
    target = {0: 0.75, 1: 0.1, 2: 0.5}
    calls = []

    def fake_eval(lams, val, protocol):
        calls.append(lams)
        return {"acc": -sum((v - target[i]) ** 2 for i, v in enumerate(lams))}

    monkeypatch.setattr(D, "evaluate_items", fake_eval)
    out = D.tune_lambdas(_Systems(), ("image", "audio", "video"), val=[])
    assert out["lam"] == [0.75, 0.1, 0.5]
    assert out["val"] == 0 and len(calls) == len(set(calls)) <= D.tuning_steps(("image", "audio", "video"))
    assert out["trace"][0] == {"modality": "all", "lam": 1 / 3, "score": pytest.approx(-(0.75 - 1 / 3) ** 2
                                                                                      - (0.1 - 1 / 3) ** 2
                                                                                      - (0.5 - 1 / 3) ** 2)}


def test_a_tie_keeps_the_default(monkeypatch):
    monkeypatch.setattr(D, "evaluate_items", lambda lams, val, protocol: {"acc": 0.5})
    assert D.tune_lambdas(_Systems(), ("image", "audio"), val=[])["lam"] == [0.5, 0.5]


def test_fallback_lambdas_follow_the_single_scores_and_name_a_missing_model(tmp_path):
    (tmp_path / "world.json").write_text("{}")
    models = {"image-decoupled": {"a": {"acc": 0.9}, "b": {"acc": 0.7}}, "audio-decoupled": {"a": {"acc": 0.4}}}
    (tmp_path / "replicas.json").write_text(json.dumps({"models": models, "seconds": {}}))
    assert D.fallback_lambdas(("image", "audio"), tmp_path) == pytest.approx([0.8 / 1.2, 0.4 / 1.2])
    with pytest.raises(FileNotFoundError, match="point-decoupled"):
        D.fallback_lambdas(("image", "point"), tmp_path)
