"""MCUB on real composed models: real media through each source's processor, a chat template, greedy decoding,
the first character against the gold letter (case-sensitive), as the model-composition paper's scripts score it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mckit.eval.mcub import MCUBItem
from mckit.eval.media import decode
from mckit.eval.protocols import restrict, wilson
from mckit.models.mllm import MLLM

#: Vicuna v1's conversation template (LLaVA-1.5, Video-LLaVA, the model-composition paper's evaluation).
VICUNA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the human's questions. USER: {prompt} ASSISTANT:")


def real_inputs(model: MLLM, items: list[MCUBItem], preprocess: dict[str, Callable],
                template: str = VICUNA_V1) -> tuple[list[str], list[dict]]:
    """Prompts in ``template`` and processed inputs of ``items`` (modalities the model lacks removed)."""
    prompts, inputs = [], []
    for it in items:
        prompt, paths = restrict(it.prompt, it.media, model.modalities)
        missing = [m for m in paths if m not in preprocess]
        if missing:
            raise ValueError(f"item {it.id!r}: no processor for {missing[0]} inputs (have {sorted(preprocess)})")
        inputs.append({m: [preprocess[m](decode(p, m)) for p in ps] for m, ps in paths.items()})
        prompts.append(template.format(prompt=prompt))
    return prompts, inputs


@torch.no_grad()
def evaluate_real(model: MLLM, items: list[MCUBItem], preprocess: dict[str, Callable], template: str = VICUNA_V1,
                  batch_size: int = 8, max_new_tokens: int = 128, progress: bool = True) -> dict:
    """Greedy answers of ``model`` to ``items`` in batches; correct when ``answer[:1] == gold letter``.

    ``{"acc", "ci95", "n", "answers": [str], "correct": [bool]}``.
    """
    from tqdm.auto import tqdm

    answers = []
    for start in tqdm(range(0, len(items), batch_size), desc="MCUB (real)", disable=not progress, leave=False):
        chunk = items[start:start + batch_size]
        prompts, inputs = real_inputs(model, chunk, preprocess, template)
        answers += model.generate(model.batch(prompts, inputs), max_new_tokens)
    correct = [a[:1] == it.answer for a, it in zip(answers, items)]
    hits = sum(correct)
    return {"acc": hits / len(items) if items else 0.0, "ci95": list(wilson(hits, len(items))), "n": len(items),
            "answers": answers, "correct": correct}
