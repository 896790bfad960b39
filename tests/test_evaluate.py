"""Evaluation protocols: the one-forward fast path equals generate; option scores are log-likelihoods."""

import pytest
import torch

from mckit.eval.mcub import load_benchmark
from mckit.eval.protocols import (
    first_token_answers,
    generated_answers,
    NAMED_LETTER,
    evaluate_items,
    item_inputs,
    letter_hits,
    named_letter,
    option_score_answers,
    restrict,
    sequence_logprob,
    wilson,
)


def test_restrict_drops_other_modalities():
    prompt = "video : <video> . image : <image> . what do they have in common ?"
    p, media = restrict(prompt, {"video": [1], "image": [2]}, ["image"])
    assert p == "image : <image> . what do they have in common ?" and media == {"image": [2]}
    p, _ = restrict("<image>\n<audio>\nWhat?", {"image": [1], "audio": [2]}, ["audio"])
    assert p == "<audio> What?"


@pytest.mark.parametrize("split", ["MCUB-4", "MCUB-3-image-video-point", "single/point"])
def test_fast_path_equals_generate_item_by_item(bench, tiny_mllm, split):
    """The first generated token decides the first character; one forward pass gives the same token."""
    items = load_benchmark(split, "test", bench)
    fast = first_token_answers(tiny_mllm, items, batch_size=7)
    slow = generated_answers(tiny_mllm, items, batch_size=5)
    assert len(fast) == len(items) and all(s.startswith(f) for f, s in zip(fast, slow)), list(zip(fast, slow))
    assert sum(bool(f) for f in fast) > len(items) // 2  # real tokens, not end-of-sequence everywhere


def test_sequence_logprob_matches_the_model_loss(bench, tiny_mllm):
    """Summed label log-probs / label count == transformers' mean cross-entropy, row by row."""
    items = load_benchmark("MCUB-4", "test", bench)[:3]
    prompts, inputs = item_inputs(tiny_mllm, items, answer_with="word")
    for p, x, it in zip(prompts, inputs, items):
        batch = tiny_mllm.batch([p], [x], [it.options[0]])
        with torch.no_grad():
            out = tiny_mllm(batch)
        n = int((batch.labels[:, 1:] != -100).sum())
        assert float(-sequence_logprob(out.logits, batch.labels)[0] / n) == pytest.approx(float(out.loss), rel=1e-5)


def test_option_score_is_batch_invariant(bench, tiny_mllm):
    items = load_benchmark("MCUB-3-audio-video-point", "test", bench)[:9]
    assert option_score_answers(tiny_mllm, items, batch_size=2) == option_score_answers(tiny_mllm, items, batch_size=9)


def test_letter_hits_reads_the_first_character(bench):
    items = load_benchmark("MCUB-4", "test", bench)[:2]
    golds = [it.answer for it in items]
    assert letter_hits([golds[0] + " because", "Z"], items) == [True, golds[1] == "Z"]


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_named_letter_reads_the_letter_a_reply_names():
    assert named_letter("red , and the letter is C") == "C"
    assert named_letter("the answer is red, so the letter is (B).") == "B"
    assert named_letter("B") == "B" and named_letter("(D) sea") == "D" and named_letter(" A. red") == "A"
    assert named_letter("red") == "" and named_letter("big ones") == "" and named_letter("") == ""


def test_named_letter_protocol_scores_generated_replies(bench, tiny_mllm):
    items = load_benchmark("MCUB-4", "test", bench)
    replies = generated_answers(tiny_mllm, items)
    expected = sum(named_letter(r) == it.answer for r, it in zip(replies, items)) / len(items)
    assert evaluate_items(tiny_mllm, items, NAMED_LETTER, batch_size=3)["acc"] == pytest.approx(expected)
