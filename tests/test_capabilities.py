"""The five capability tasks of the merging benchmark: seeded, answerable in the world's words, balanced."""

from collections import Counter

import numpy as np
import pytest

from mckit.models import shipped
from mckit.world.capabilities import CHANCE, LABEL_CLASSES, TASKS, capability_items


@pytest.fixture(scope="module")
def world():
    return shipped.load_world()


@pytest.mark.parametrize("task", TASKS)
def test_items_are_seeded_and_parts_differ(world, task):
    a, b = capability_items(world, task, 20, "val"), capability_items(world, task, 20, "val")
    assert all(np.array_equal(x.image, y.image) and x.answer == y.answer for x, y in zip(a, b))
    test = capability_items(world, task, 20, "test")
    assert not any(np.array_equal(x.image, y.image) for x in a for y in test)
    for it in a:
        assert it.image.shape == (3, 16, 16) and it.image.dtype == np.float32
        assert 0 <= it.image.min() and it.image.max() <= 1 and 0 <= it.label < LABEL_CLASSES[task]


@pytest.mark.parametrize("task", TASKS)
def test_questions_and_answers_use_only_the_worlds_words(world, task):
    vocab = shipped.load_tokenizer().get_vocab()
    for it in capability_items(world, task, 50, "train"):
        words = it.prompt.replace("<image>", "").split() + it.answer.split()
        assert all(w in vocab for w in words), (it.prompt, it.answer)


@pytest.mark.parametrize("task", TASKS)
def test_no_answer_prior_beats_chance(world, task):
    """The most frequent answer of the test items is right about as often as chance (no class prior to learn)."""
    answers = Counter(it.answer for it in capability_items(world, task, 800, "test"))
    assert len(answers) == round(1 / CHANCE[task]) if task != "vqa" else len(answers) == 12
    assert max(answers.values()) / 800 <= 2 * CHANCE[task] + 0.05, answers


def test_bad_task_or_part(world):
    with pytest.raises(ValueError, match="unknown capability task 'maths'"):
        capability_items(world, "maths", 1, "test")
    with pytest.raises(ValueError, match="part must be one of"):
        capability_items(world, "ocr", 1, "dev")
