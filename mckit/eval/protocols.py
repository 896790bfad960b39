"""Evaluation: every accuracy with n and a 95% Wilson interval, and the protocol that produced it.

Protocols: ``letter`` (greedy decoding, first character == gold letter: MCUB's
metric; read from one forward pass, which a test proves equal to ``generate``),
``named_letter`` (greedy decoding, the letter the reply names: ``... the letter is C``,
or a reply that starts with a letter), ``option_score`` (the most likely option
text as the reply) and ``exact_match`` (open single-modality questions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from mckit.eval.mcub import MCUBItem, load_media
from mckit.models.mllm import MLLM
from mckit.models.training import FeatureBank, to_batch
from mckit.world.tasks import ANSWER_WITH, Example, chat


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (robust near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def predict(model: MLLM, examples: list[Example], banks: dict[str, FeatureBank], seed: int = 0,
            batch_size: int = 128, desc: str = "evaluating") -> list[str]:
    """Greedy answers to ``examples`` (features drawn from ``banks`` with ``seed``)."""
    rng = np.random.default_rng([seed, 41])
    out: list[str] = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        chunk = examples[i:i + batch_size]
        out += model.generate(to_batch(model, chunk, banks, rng, with_answers=False))
    return out


def score(examples: list[Example], predictions: list[str]) -> dict[str, dict]:
    """Exact-match accuracy per task: ``{task: {"acc", "ci95", "n"}}``."""
    hits: dict[str, list[int]] = defaultdict(list)
    for ex, pred in zip(examples, predictions):
        hits[ex.task.split(":")[0]].append(int(pred == ex.answer))
    return {t: {"acc": float(np.mean(h)), "ci95": list(wilson(sum(h), len(h))), "n": len(h)} for t, h in hits.items()}


# --------------------------------------------------------------------------- MCUB-schema items

#: Protocol names every table carries.
LETTER, NAMED_LETTER, OPTION_SCORE, EXACT = "letter", "named_letter", "option_score", "exact_match"
#: The multiple-choice protocols, in the order tables show them.
PROTOCOLS = (LETTER, NAMED_LETTER, OPTION_SCORE)
_NAMES_LETTER = re.compile(r"\bletter is \(?([A-H])\b")
_STARTS_WITH_LETTER = re.compile(r"\(?([A-H])\b")


def named_letter(reply: str) -> str:
    """The option letter a reply names: after "letter is", else the letter it starts with, else ""."""
    found = _NAMES_LETTER.search(reply) or _STARTS_WITH_LETTER.match(reply.strip())
    return found.group(1) if found else ""


def restrict(prompt: str, media: dict[str, list], keep: list[str]) -> tuple[str, dict[str, list]]:
    """Drop the inputs of modalities a model lacks, as the paper does for single-modality models.

    A ``"audio : <audio> ."`` slot is removed whole; a bare ``<audio>`` placeholder
    (real MCUB prompts) is removed on its own.
    """
    for mod in media:
        if mod not in keep:
            prompt = re.sub(rf"\s*\b{mod} : <{mod}> \.", "", prompt).replace(f"<{mod}>", "")
    return " ".join(prompt.split()), {m: v for m, v in media.items() if m in keep}


def item_inputs(model: MLLM, items: list[MCUBItem], answer_with: str | None = None) -> tuple[list[str], list[dict]]:
    """Chat prompts and raw inputs of ``items`` for ``model`` (other modalities removed).

    ``answer_with="word"`` swaps the letter instruction for the word one (option scoring).
    """
    prompts, inputs = [], []
    for it in items:
        media = {m: [_media(p) for p in paths] for m, paths in it.media.items()}
        prompt, media = restrict(it.prompt, media, model.modalities)
        if answer_with is not None:
            prompt = prompt.replace(ANSWER_WITH["letter"], ANSWER_WITH[answer_with])
        prompts.append(chat(prompt))
        inputs.append(media)
    return prompts, inputs


@functools.lru_cache(maxsize=8192)
def _media(path) -> np.ndarray:
    return load_media(path)


def _chunks(n: int, size: int, desc: str, progress: bool):
    """Batch starts; a progress bar only when asked (callers that loop over many evaluations show their own)."""
    return tqdm(range(0, n, size), desc=desc, leave=False, disable=not progress)


@torch.no_grad()
def first_token_answers(model: MLLM, items: list[MCUBItem], batch_size: int = 128, progress: bool = False) -> list[str]:
    """Fast path: the greedy first token from ONE forward pass, decoded (what ``generate`` starts with)."""
    out: list[str] = []
    for i in _chunks(len(items), batch_size, "letter", progress):
        prompts, inputs = item_inputs(model, items[i:i + batch_size])
        logits = model(model.batch(prompts, inputs)).logits[:, -1]
        out += [model.tokenizer.decode([t], skip_special_tokens=True).strip() for t in logits.argmax(-1).tolist()]
    return out


@torch.no_grad()
def generated_answers(model: MLLM, items: list[MCUBItem], batch_size: int = 128, max_new_tokens: int = 10,
                      progress: bool = False) -> list[str]:
    """Greedy decoding with ``generate`` (the paper's protocol)."""
    out: list[str] = []
    for i in _chunks(len(items), batch_size, "generate", progress):
        prompts, inputs = item_inputs(model, items[i:i + batch_size])
        out += model.generate(model.batch(prompts, inputs), max_new_tokens)
    return out


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_t log p(label_t | prefix) over labelled positions: (B, L, V), (B, L) -> (B,)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


@torch.no_grad()
def option_score_answers(model: MLLM, items: list[MCUBItem], batch_size: int = 32, progress: bool = False) -> list[str]:
    """Option scoring: the letter of the option whose text (+ ``</s>``) is most likely as the answer.

    The prompt asks for the word instead of the letter, and each option's text is
    scored as the assistant's reply: sum of its tokens' log-probabilities.
    """
    out: list[str] = []
    for i in _chunks(len(items), batch_size, "option score", progress):
        chunk = items[i:i + batch_size]
        prompts, inputs = item_inputs(model, chunk, answer_with="word")
        rows = [(p, x, opt) for p, x, it in zip(prompts, inputs, chunk) for opt in it.options]
        batch = model.batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        scores = sequence_logprob(model(dataclasses.replace(batch, labels=None)).logits, batch.labels)
        pos = 0
        for it in chunk:
            k = len(it.options)
            out.append("ABCDEFGH"[int(scores[pos:pos + k].argmax())])
            pos += k
    return out


def accuracy(hits: list[bool], protocol: str) -> dict:
    """``{"acc", "ci95", "n", "protocol"}`` with a 95% Wilson interval."""
    k, n = int(sum(hits)), len(hits)
    return {"acc": k / n if n else float("nan"), "ci95": list(wilson(k, n)), "n": n, "protocol": protocol}


def letter_hits(answers: list[str], items: list[MCUBItem]) -> list[bool]:
    """The paper's metric: the first character of the output equals the gold letter."""
    return [a[:1] == it.answer.strip()[:1] for a, it in zip(answers, items)]


def evaluate_items(model: MLLM, items: list[MCUBItem], protocol: str = LETTER, batch_size: int = 128,
                   progress: bool = False) -> dict:
    """Accuracy of ``model`` on multiple-choice ``items`` under ``protocol`` (one of :data:`PROTOCOLS`)."""
    if protocol == LETTER:
        answers = first_token_answers(model, items, batch_size, progress)
    elif protocol == NAMED_LETTER:
        answers = [named_letter(a) for a in generated_answers(model, items, batch_size, progress=progress)]
    elif protocol == OPTION_SCORE:
        answers = option_score_answers(model, items, max(1, batch_size // 4), progress)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return accuracy(letter_hits(answers, items), protocol)


def exact_match_by_task(answers: list[str], items: list) -> dict[str, dict]:
    """Exact-match accuracy per ``item.task``: ``{task: {"acc", "ci95", "n", "protocol"}}``."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for a, it in zip(answers, items):
        by_task[it.task].append(a == it.answer)
    return {t: accuracy(h, EXACT) for t, h in by_task.items()}
