"""Training: the base LM on text, then each MLLM in two stages (projector, then projector + LLM).

Stage 1 trains the projector only, on captions ("what is this ? -> this is a
bako"), with the LLM frozen. Stage 2 trains the projector and the LLM on the
modality's instruction tasks mixed with text tasks, either with LoRA on all
seven linears of every layer (q,k,v,o,gate,up,down) or by full fine-tuning
of those linears. Embeddings, lm_head and norms stay frozen in both, so a
task vector lives exactly in the 2-D linear weights that merging touches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from mckit.models.batch import Batch
from mckit.models.lora import is_lora, is_lora_parameter, quiet_peft
from mckit.models.mllm import MLLM, Branch
from mckit.world.entities import World
from mckit.world.tasks import Example, Slots, chat, drill, sample


class Presets:
    """Mixin for a build config dataclass: ``preset("full")`` is the defaults, ``preset("smoke")``
    the class's ``SMOKE`` overrides (a fast pipeline check); ``KIND`` names the config in errors."""

    KIND = "config"
    SMOKE: dict = {}

    @classmethod
    def preset(cls, name: str):
        if name == "full":
            return cls()
        if name == "smoke":
            return cls(**cls.SMOKE)
        raise ValueError(f"unknown {cls.KIND} preset {name!r}; expected 'full' or 'smoke'")


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Text share of every stage-2 batch, so the text skills stay.
TEXT_SHARE = 0.25
STAGE2_MIX = {"identify": 1.0, "attribute": 2.0, "choice": 1.0, "describe": 1.0, "level": 1.0, "common": 2.0}
TEXT_MIX = {"fact": 1.0, "identify": 1.0, "attribute": 2.0, "choice": 2.0, "common": 3.0}
#: Stage-2 modes: LoRA on the seven linears, full fine-tuning of them, or the LLM frozen
#: (projector only, on the instruction data: the "frozen LLM, stage-2 projectors" control).
STAGE2_MODES = ("lora", "full", "frozen")


def make_llm(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 384,
             seed: int = 0) -> LlamaForCausalLM:
    """A small Llama-family causal LM (the stand-in for vicuna-7b), randomly initialised."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class FeatureBank:
    """Cached frozen-encoder features of many renders, indexed by (entity, level).

    Because encoders are frozen, features are computed once per render and reused
    by every training step: the expensive part of an MLLM step becomes the LLM.
    """

    def __init__(self, branch: Branch, bank: dict[str, np.ndarray]):
        """``bank``: a :func:`mckit.world.render.render_bank` result for ``branch``'s modality."""
        with torch.no_grad():
            self.feats = torch.cat([branch.encode(torch.from_numpy(x)) for x in np.array_split(bank["x"], 8)])
        self.rows: dict[tuple[int, int], np.ndarray] = {}
        for key in {(int(e), int(lv)) for e, lv in zip(bank["entity"], bank["level"])}:
            self.rows[key] = np.flatnonzero((bank["entity"] == key[0]) & (bank["level"] == key[1]))

    def draw(self, entity: int, level: int, rng: np.random.Generator) -> torch.Tensor:
        """Features (T_enc, d_enc) of a random render of ``entity`` at ``level``."""
        rows = self.rows[(entity, level)]
        return self.feats[rows[rng.integers(len(rows))]]


def to_batch(model: MLLM, examples: list[Example], banks: dict[str, FeatureBank], rng: np.random.Generator,
             with_answers: bool = True) -> Batch:
    """Examples -> a training/eval batch, with features drawn from ``banks``."""
    feats = [{m: [banks[m].draw(e, lv, rng) for e, lv in pairs] for m, pairs in ex.inputs.items()} for ex in examples]
    prompts = [chat(ex.prompt) for ex in examples]
    answers = [ex.answer for ex in examples] if with_answers else None
    return model.batch(prompts, feats, answers, encoded=True)


def mixed_examples(world: World, rng: np.random.Generator, n: int, modality: str | None,
                   mix: dict[str, float], text_share: float = 0.0) -> list[Example]:
    """``n`` examples: a ``text_share`` fraction of text tasks, the rest from ``modality``'s ``mix``."""
    n_text = int(round(n * text_share)) if modality is not None else n
    text = [sample(world, rng, None, TEXT_MIX) for _ in range(n_text)]
    return text + [sample(world, rng, modality, mix) for _ in range(n - n_text)]


def fit(model: MLLM, params: list[torch.nn.Parameter], next_batch: Callable[[int], Batch], steps: int, lr: float,
        desc: str, warmup: int = 30) -> list[float]:
    """AdamW + cosine schedule with warm-up + grad-norm clipping 1.0; returns the loss per step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps // 10 + 1), steps)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        loss = model(next_batch(step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def pretrain_text(model: MLLM, world: World, steps: int, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, drill_steps: int = 0, drill_share: float = 0.0) -> list[float]:
    """Train the base LM (all parameters) on generated text about the world; returns the loss per step.

    A curriculum for letter binding: ``drill_steps`` of the letter drill alone
    (:func:`mckit.world.tasks.drill`), then ``steps`` of the text stream with a
    ``drill_share`` of each batch kept as drill. Each phase has its own optimiser
    and warm-up. Measured at width 128 (batch 64, lr 1e-3): the drill alone, on a cosine schedule
    over 2000 steps, stopped at step 500 with 0.98 of the letters of held-out option lists right; mixed into the
    stream from the start instead, lettered answers stay near chance for 3000 steps. (The shipped
    world runs 1000 drill steps, so that its first 500 see a learning rate as high.)
    """
    rng = np.random.default_rng([seed, 11])
    params = [p for p in model.llm.parameters()]
    for p in params:
        p.requires_grad_(True)
    n_drill = int(round(batch_size * drill_share))

    def drill_batch(_: int) -> Batch:
        return to_batch(model, [drill(world, rng, Slots(None, rng)) for _ in range(batch_size)], {}, rng)

    def next_batch(_: int) -> Batch:
        examples = mixed_examples(world, rng, batch_size - n_drill, None, {})
        return to_batch(model, examples + [drill(world, rng, Slots(None, rng)) for _ in range(n_drill)], {}, rng)

    losses = fit(model, params, drill_batch, drill_steps, lr, "letter drill") if drill_steps else []
    return losses + fit(model, params, next_batch, steps, lr, "text pretraining")


def train_stage1(model: MLLM, modality: str, world: World, bank: FeatureBank, steps: int, batch_size: int = 64,
                 lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Stage 1: projector only, on captions, LLM frozen."""
    rng = np.random.default_rng([seed, 21])
    model.llm.requires_grad_(False)
    params = list(model.branches[modality].projector.parameters())
    for p in params:
        p.requires_grad_(True)

    def next_batch(_: int) -> Batch:
        return to_batch(model, mixed_examples(world, rng, batch_size, modality, {"identify": 1.0}), {modality: bank}, rng)

    return fit(model, params, next_batch, steps, lr, f"{modality} stage 1")


def add_lora(model: MLLM, rank: int = 32, alpha: int | None = None, dropout: float = 0.05) -> None:
    """Wrap the LLM with peft LoRA on all seven linears (paper: r=128, alpha=256, dropout 0.05)."""
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=list(LINEARS),
                        bias="none")
    with quiet_peft():
        model.llm = get_peft_model(model.llm, config)


def llm_trainable(model: MLLM, mode: str) -> list[torch.nn.Parameter]:
    """Stage-2 LLM parameters: LoRA A/B (``"lora"``), the seven linears' weights (``"full"``), the text and
    modality LoRAs of a decoupled model (``"decoupled"``, :mod:`mckit.models.decoupled`) or none."""
    model.llm.requires_grad_(False)
    if mode == "frozen":
        return []
    if mode == "lora":
        params = [p for n, p in model.llm.named_parameters() if is_lora_parameter(n)]
    elif mode == "full":
        params = [p for n, p in model.llm.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in LINEARS]
    elif mode == "decoupled":
        params = [p for n, p in model.llm.named_parameters() if ".deltas." in n]
        if not params:
            raise ValueError("mode 'decoupled' needs a decoupled LLM (mckit.models.decoupled.decouple)")
    else:
        raise ValueError(f"stage-2 mode must be one of {(*STAGE2_MODES, 'decoupled')}, got {mode!r}")
    for p in params:
        p.requires_grad_(True)
    return params


def train_stage2(model: MLLM, modality: str, world: World, bank: FeatureBank, mode: str, steps: int,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Stage 2: projector + LLM (LoRA, full, or frozen = projector only) on the modality's tasks mixed with text."""
    rng = np.random.default_rng([seed, 31])
    if mode == "lora" and not is_lora(model.llm):
        add_lora(model)
    params = list(model.branches[modality].projector.parameters()) + llm_trainable(model, mode)
    for p in model.branches[modality].projector.parameters():
        p.requires_grad_(True)

    def next_batch(_: int) -> Batch:
        examples = mixed_examples(world, rng, batch_size, modality, STAGE2_MIX, TEXT_SHARE)
        return to_batch(model, examples, {modality: bank}, rng)

    return fit(model, params, next_batch, steps, lr, f"{modality} stage 2 ({mode})")



def train_new_task(model: MLLM, modality: str, world: World, bank: FeatureBank, task: Callable, steps: int,
                   batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Naive fine-tuning on a new task: the seven linears of ``model``'s LLM (full), on ``task`` examples only
    (no replay of the old tasks), the branch frozen; ``task(world, rng, slots) -> Example``."""
    rng = np.random.default_rng([seed, 37])
    params = llm_trainable(model, "full")
    model.branches[modality].requires_grad_(False)

    def next_batch(_: int) -> Batch:
        return to_batch(model, [task(world, rng, Slots(modality, rng)) for _ in range(batch_size)],
                        {modality: bank}, rng)

    return fit(model, params, next_batch, steps, lr, f"{modality} new task")
