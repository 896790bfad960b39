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


def test_splits_by_count_name_mcubs_subsets_and_pairs_of_their_own(world, tmp_path):
    from mckit.eval.mcub import SPLITS, load_benchmark, subsets, write_test_splits

    assert {**subsets(3), **subsets(4)} == SPLITS
    pairs = subsets(2)
    assert len(pairs) == 6 and all(len(m) == 2 for m in pairs.values())
    write_test_splits(tmp_path / "pairs", world, pairs, 8)
    items = {split: load_benchmark(split, "test", tmp_path / "pairs") for split in pairs}
    for split, mods in pairs.items():
        assert len(items[split]) == 8
        assert all(sorted(it.media) == sorted(mods) and all(len(v) == 1 for v in it.media.values())
                   for it in items[split])
    # two pairs whose modality indices add up alike still get items of their own
    assert [it.options for it in items["MCUB-2-image-point"]] != [it.options for it in items["MCUB-2-audio-video"]]


def test_pooled_by_count_adds_up_correct_answers_over_the_splits_of_each_size():
    from mckit.eval.protocols import wilson

    def part(k, acc_n):
        return {"k": k, "results": {"option_score": {"damc": {"acc": acc_n[0], "n": acc_n[1]}}}}

    pooled = D.pooled_by_count({"a": part(2, (0.5, 10)), "b": part(2, (1.0, 30)), "c": part(4, (0.25, 8))})
    two = pooled["option_score"]["2"]["damc"]
    assert two["n"] == 40 and two["acc"] == pytest.approx(35 / 40) and two["ci95"] == list(wilson(35, 40))
    assert pooled["option_score"]["4"]["damc"] == {"acc": 0.25, "ci95": list(wilson(2, 8)), "n": 8}
