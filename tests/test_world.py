from collections import Counter

import numpy as np
import pytest

from mckit.world.entities import FAMILIES, MODALITIES, make_world
from mckit.world.render import RENDERERS, render, render_bank
from mckit.eval.single import drill_correct
from mckit.world.tasks import LETTERS, Slots, commonality, corpus_words, drill, drill_split, reply_letter

SHAPES = {"image": (3, 16, 16), "audio": (1024,), "video": (4, 16, 16), "point": (128, 6)}


def test_world_is_seeded_and_balanced():
    a, b, c = make_world(0), make_world(0), make_world(1)
    assert a == b and a.names != c.names
    for fam, values in FAMILIES.items():
        counts = Counter(e.attrs[fam] for e in a.entities)
        assert set(counts) == set(values) and set(counts.values()) == {len(a.entities) // len(values)}
    assert len({tuple(e.attrs.values()) for e in a.entities}) == len(a.entities)


@pytest.mark.parametrize("modality", MODALITIES)
def test_renderers_deterministic_per_seed(world, modality):
    e = world.entities[3]
    x1 = render(modality, world, e, "high", np.random.default_rng(5))
    x2 = render(modality, world, e, "high", np.random.default_rng(5))
    x3 = render(modality, world, e, "high", np.random.default_rng(6))
    assert x1.shape == SHAPES[modality] and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)


def test_render_bank_labels(world):
    bank = render_bank("image", world, 4, seed=1)
    assert bank["x"].shape == (len(world.entities) * 4, 3, 16, 16)
    assert Counter(bank["level"].tolist()) == {0: 64, 1: 64}
    np.testing.assert_array_equal(bank["x"], render_bank("image", world, 4, seed=1)["x"])


def test_level_changes_what_it_should(world):
    """high/low is a real, modality-specific signal: upper vs lower half of the image, etc."""
    e = world.entities[0]
    hi = render("image", world, e, "high", np.random.default_rng(0))
    lo = render("image", world, e, "low", np.random.default_rng(0))
    assert hi[:, :8].sum() > hi[:, 8:].sum() and lo[:, 8:].sum() > lo[:, :8].sum()
    pts_hi = render("point", world, e, "high", np.random.default_rng(0))
    pts_lo = render("point", world, e, "low", np.random.default_rng(0))
    assert pts_hi[:, 2].mean() > pts_lo[:, 2].mean() + 1.0


def test_bad_modality_and_level(world):
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        render("smell", world, world.entities[0], "high", np.random.default_rng(0))
    with pytest.raises(ValueError, match="level"):
        render("image", world, world.entities[0], "middle", np.random.default_rng(0))
    assert set(RENDERERS) == set(MODALITIES)


def test_commonality_items_have_one_right_option(world):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ex = commonality(world, rng, Slots(None, rng), k=int(rng.integers(2, 5)), answer="word")
        names = [w for w in ex.prompt.split() if w in world.names]
        options = ex.prompt.split("?")[1].split()
        values = [options[i + 3] for i in range(0, 16, 4)]
        shared = [v for v in values if all(v in world.by_name(n).attrs.values() for n in names)]
        assert shared == [ex.answer]


def test_lettered_commonality_names_the_gold_word_then_its_letter(world):
    rng = np.random.default_rng(1)
    for i in range(100):
        ex = commonality(world, rng, Slots(None, rng), answer="letter", gold_at=i % 4)
        options = ex.prompt.split("?")[1].split()
        word, letter = ex.answer.split()[0], reply_letter(ex.answer)
        assert letter == LETTERS[i % 4] and options[4 * (i % 4) + 3] == word
        assert ex.answer == f"{word} , and the letter is {letter}"
    assert reply_letter("red") is None and reply_letter("red , and the letter is E") is None


def test_drill_binds_every_option_and_holds_out_option_lists(world):
    rng = np.random.default_rng(2)
    seen = {"train": set(), "test": set()}
    for split in ("train", "test"):
        for _ in range(300):
            ex = drill(world, rng, Slots(None, rng), split=split)
            options = tuple(ex.prompt.split()[3:16:4])
            assert drill_split(list(options)) == split and drill_correct(ex.prompt, ex.answer)
            seen[split].add(options)
            wrong = ex.answer.replace(" A", " Q")
            assert not drill_correct(ex.prompt, wrong)
            assert not drill_correct(ex.prompt, " , ".join(ex.answer.split(" , ")[:3]))     # one option missing
    assert seen["train"] and seen["test"] and not seen["train"] & seen["test"]


def test_tokenizer_covers_every_task_word(world, tokenizer):
    unk = tokenizer.unk_token_id
    for word in corpus_words(world):
        assert tokenizer.convert_tokens_to_ids(word) != unk, word

