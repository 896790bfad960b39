"""MCUB files: the schema round-trips, bad files fail loudly, and the benchmark has no shortcut."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest

from mckit.eval.mcub import SPLITS, MCUBError, load_benchmark, load_split, mcub_examples, parse_options
from mckit.world.tasks import LETTERS, Slots, combo_split, commonality


def test_schema_round_trip(bench):
    for split, mods in SPLITS.items():
        items = load_benchmark(split, "test", bench)
        assert len(items) == 40
        raw = json.loads((bench / split / "test.json").read_text())
        assert all(len(r["conversations"]) == 1 and r["conversations"][0]["from"] == "human" for r in raw)
        for it in items:
            assert sorted(it.modalities) == sorted(mods) and len(it.options) == 4
            assert it.answer in LETTERS and all(p.is_file() for ps in it.media.values() for p in ps)
    single = load_benchmark("single/audio", "test", bench)
    assert {it.task for it in single} == {"identify", "attribute", "describe", "level"}


def test_loader_reads_real_style_files(tmp_path):
    """Media resolved against a user's root; options as 'A. text' lines; schema keys vision/point."""
    (tmp_path / "img").mkdir()
    np.save(tmp_path / "img" / "1.npy", np.zeros((3, 16, 16), np.float32))
    np.save(tmp_path / "p.npy", np.zeros((128, 6), np.float32))
    item = {"id": "q1", "conversations": [{"from": "human", "value": "<image>\n<point>\nWhat do they share?\n"
                                                                       "A. sea\nB. sky\nC. fur\nD. wheels"}],
            "modal_inputs": {"vision": ["img/1.npy"], "point": "p.npy"}}
    (tmp_path / "q.json").write_text(json.dumps([item]))
    (tmp_path / "a.json").write_text(json.dumps([{**item, "conversations": item["conversations"] + [
        {"from": "gpt", "value": "C"}]}]))
    [it] = load_split(tmp_path / "q.json", tmp_path / "a.json", root=tmp_path)
    assert it.options == ["sea", "sky", "fur", "wheels"] and it.answer == "C"
    assert it.media["image"] == [tmp_path / "img" / "1.npy"] and it.modalities == ["image", "point"]


def _corrupt(bench, tmp_path, edit):
    root = tmp_path / "copy"
    shutil.copytree(bench / "MCUB-4", root / "MCUB-4")
    (root / "media").symlink_to(bench / "media")
    answers = json.loads((root / "MCUB-4" / "test_answers.json").read_text())
    edit(answers)
    (root / "MCUB-4" / "test_answers.json").write_text(json.dumps(answers))
    (root / "MCUB-4" / "test.json").write_text(json.dumps(answers))
    return root


def test_missing_media_names_item_and_file(bench, tmp_path):
    def edit(records):
        records[3]["modal_inputs"]["audio"] = ["media/test/audio/nope.npy"]
    root = _corrupt(bench, tmp_path, edit)
    with pytest.raises(MCUBError, match=r"MCUB-4-test-0003.*missing audio file .*nope\.npy"):
        load_benchmark("MCUB-4", "test", root)


def test_answer_not_an_option_letter(bench, tmp_path):
    def edit(records):
        records[5]["conversations"][1]["value"] = "E"
    root = _corrupt(bench, tmp_path, edit)
    with pytest.raises(MCUBError, match=r"MCUB-4-test-0005.*answer 'E' is not one of the option letters ABCD"):
        load_benchmark("MCUB-4", "test", root)


def test_placeholder_without_file(bench, tmp_path):
    def edit(records):
        records[0]["modal_inputs"]["video"] = []
    root = _corrupt(bench, tmp_path, edit)
    with pytest.raises(MCUBError, match="MCUB-4-test-0000.*<video> placeholder"):
        load_benchmark("MCUB-4", "test", root)


def test_parse_options():
    assert parse_options("x ? ( A ) colour ( B ) home ( C ) size ( D ) sound . answer with the letter .") == [
        "colour", "home", "size", "sound"]
    with pytest.raises(MCUBError, match="lettered"):
        parse_options("( A ) x ( C ) y")


@pytest.mark.parametrize("split", list(SPLITS))
def test_combinations_disjoint_from_training_and_each_other(world, split):
    """Test and val items come from their own hash buckets; training commonality never draws them."""
    def combos(part):
        return {tuple(sorted(e for pairs in ex.inputs.values() for e, _ in pairs))
                for ex in mcub_examples(world, SPLITS[split], 100, part, seed=0)}
    test, val = combos("test"), combos("val")
    assert not test & val
    rng = np.random.default_rng(0)
    train = {tuple(sorted(e for pairs in ex.inputs.values() for e, _ in pairs))
             for ex in (commonality(world, rng, Slots("image", rng), k=len(SPLITS[split])) for _ in range(300))}
    assert not train & (test | val)
    assert all(combo_split([world.entities[i] for i in c]) == "test" for c in test)


@pytest.mark.parametrize("split", list(SPLITS))
def test_frequency_oracle_is_at_chance(world, split):
    """Gold letters and gold option texts are balanced: guessing by frequency (learned on val) gains nothing."""
    test = mcub_examples(world, SPLITS[split], 400, "test", seed=0)
    val = mcub_examples(world, SPLITS[split], 400, "val", seed=0)
    letters = Counter(ex.answer for ex in test)
    assert max(letters.values()) == min(letters.values()) == 100
    # the oracle picks the option whose text was most often right on val
    gold_text = Counter(_gold_text(ex) for ex in val)
    hits = [max(_options(ex), key=lambda o: gold_text[o]) == _gold_text(ex) for ex in test]
    assert np.mean(hits) <= 0.25 + 0.07, np.mean(hits)


def _options(ex):
    return parse_options(ex.prompt)


def _gold_text(ex):
    return _options(ex)[LETTERS.index(ex.answer)]
