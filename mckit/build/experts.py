"""Capability experts for the merging benchmark: one base MLLM, five experts, a multi-task model.

``python -m mckit build-experts`` writes ``data/experts``::

    experts.json               settings, wall times, encoder probes, held-out accuracy per model and task
    base/                      the base MLLM: a general image encoder pretrained on all five image
                               kinds, its projector aligned briefly on all five tasks (LLM frozen),
                               then (``base_steps`` > 0) projector + the seven linears of the world's
                               base LLM trained on all five tasks mixed with text; its LLM is theta_0
    models/{task}-{regime}/    an expert: the base fine-tuned on one task, replaying a share of the
                               other four (regime full | lora)
    models/multitask-{regime}/ the base fine-tuned on all five tasks (the upper bound of merging)

Experts train the LLM only (the seven linears, or LoRA on them) with the
encoder and projector frozen at the base's, so a merged model keeps the base's
vision side, as in the paper's setting. Each batch mixes 25% text so the LLM
keeps its text skills (the recipe: :class:`ExpertsConfig`). The LLM is the world's base, so tokenizer and
embeddings are those of every model in ``data/world``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mckit.build.staging import load_branch, load_stage, run_stage
from mckit.eval.capabilities import capability_answers, capability_batch, eval_items, evaluate_capabilities
from mckit.models.batch import Batch
from mckit.models.checkpoints import load_llm, load_tokenizer_dir, save_mllm
from mckit.models.encoders import ENC_DIM, ENC_TOKENS
from mckit.models.lora import is_lora
from mckit.models.mllm import MLLM, toy_branch
from mckit.models.shipped import MULTITASK, REGIMES, default_experts_dir, model_name
from mckit.models.training import TEXT_SHARE, Presets, add_lora, fit, llm_trainable, mixed_examples
from mckit.storage.atomic import atomic_dir, check_replaceable
from mckit.storage.fingerprint import tree_fingerprint
from mckit.storage.stages import Stages
from mckit.world.capabilities import (
    CHANCE,
    LABEL_CLASSES,
    MAKERS,
    TASKS,
    CapabilityItem,
    capability_items,
    mixed_items,
)
from mckit.world.entities import World


@dataclass
class ExpertsConfig(Presets):
    """Steps and learning rates of the experts' build (``full``: shipped; ``smoke``: a fast pipeline check).

    The recipe, and why (full fine-tuning, 200 test items per task): the base leaves headroom, as a
    real base leaves its experts: its projector is aligned briefly (20 steps, LLM frozen) and its LLM
    is the world's base LM untouched (``base_steps=0``). With 60 alignment steps the projector alone
    learnt to read the chart (0.835 before any expert), so the chart expert had nothing left to gain
    (+2); aligned without the chart task the chart expert gained but the grounding expert stayed at
    chance. A generalist stage (40 steps at 3e-4) left geometry at 0.975 and chart at 0.84. Experts and
    the multi-task model train at 3e-4, and each expert's image items are 5% the other four tasks
    (``replay``, gold answers). Without replay every expert forgets the other tasks and no merge beats
    the base by more than 2 points; with 20% the experts become partly generalists that share one
    direction (pairwise cosines 0.35-0.52), and task arithmetic at lambda 1.0 overshoots (0.47 of
    validation against 0.70 at its best lambda); labelling the replayed items with the base's own
    answers keeps the other tasks where the base had them but the merges then gain nothing. Probes
    with a chart asked for its highest or its lowest bar: that task stayed beyond the experts (0.285
    after 300 steps, base 0.235), and without the 25% text in each batch the experts shared as much
    (cosines 0.18-0.47) and task arithmetic at lambda 1.0 kept less (0.58 of its best). Smaller moves
    leave its best lambda at 0.3 (lr 1e-4: 0.58 of its best at 1.0; 1.5e-4: 0.71), as do experts that
    train only the MLP linears (0.73) and a base taught every task's answer format on uninformative
    images first (0.24).
    """

    seed: int = 0
    encoder_steps: int = 800
    encoder_batch: int = 160
    stage1_steps: int = 20
    base_steps: int = 0
    expert_steps: int = 300
    multitask_steps: int = 750
    batch: int = 32
    full_lr: float = 3e-4
    lora_lr: float = 1e-3
    lora_rank: int = 32
    eval_items: int = 200
    replay: float = 0.05
    replay_labels: str = "gold"
    replay_items: int = 1500

    def __post_init__(self):
        if self.replay_labels not in ("base", "gold"):
            raise ValueError(f"replay_labels must be 'base' or 'gold', got {self.replay_labels!r}")
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must be a share in [0, 1), got {self.replay!r}")

    KIND: ClassVar[str] = "experts"
    SMOKE: ClassVar[dict] = dict(encoder_steps=20, encoder_batch=32, stage1_steps=10, base_steps=6,
                                 expert_steps=8, multitask_steps=8, batch=8, eval_items=8, replay_items=16)


# --------------------------------------------------------------------------- the general image encoder

def _stack(items: list[CapabilityItem]) -> torch.Tensor:
    return torch.from_numpy(np.stack([it.image for it in items]))


def pretrain_general_encoder(encoder: nn.Module, world: World, steps: int, batch: int, seed: int
                             ) -> nn.ModuleDict:
    """Train ``encoder`` to show every task's label (one linear head per task on all its tokens), then freeze it.

    The stand-in for a general vision encoder (CLIP has seen charts, text and scenes
    too). Returns the heads, for probing.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 131])
    flat = ENC_TOKENS["image"] * ENC_DIM
    heads = nn.ModuleDict({t: nn.Linear(flat, LABEL_CLASSES[t]) for t in TASKS})
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(heads.parameters()), lr=3e-3, weight_decay=0.01)
    encoder.train().requires_grad_(True)
    for _ in tqdm(range(steps), desc="general image encoder", leave=False):
        items = mixed_items(world, TASKS, batch, rng)
        feats = encoder(_stack(items)).flatten(1)
        loss = sum(nn.functional.cross_entropy(heads[t](feats[idx]), torch.tensor([items[i].label for i in idx]))
                   for t, idx in _by_task(items).items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    return heads.eval()


def _by_task(items: list[CapabilityItem]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[it.task].append(i)
    return groups


@torch.no_grad()
def probe_general_encoder(encoder: nn.Module, heads: nn.ModuleDict, world: World, n: int, seed: int
                          ) -> dict[str, float]:
    """Held-out accuracy of each task's pretraining head: what the frozen features keep."""
    out = {}
    for task in TASKS:
        items = capability_items(world, task, n, "test", seed)
        pred = heads[task](encoder(_stack(items)).flatten(1)).argmax(-1)
        out[task] = float((pred == torch.tensor([it.label for it in items])).float().mean())
    return out


# --------------------------------------------------------------------------- training and evaluation

def train_capabilities(model: MLLM, world: World, tasks: tuple[str, ...], mode: str, steps: int, batch: int,
                       lr: float, seed: int, text_share: float = TEXT_SHARE, projector: bool = False,
                       desc: str = "", replay: float = 0.0,
                       pool: dict[str, list[CapabilityItem]] | None = None) -> list[float]:
    """Fine-tune ``model`` on ``tasks`` mixed with text; the encoder stays frozen.

    ``mode``: the LLM's trainable part (full: the seven linears; lora: LoRA on them;
    frozen: nothing). ``projector``: train the projector too (the base MLLM's stages;
    experts keep the base's projector). ``replay``: the share of image items drawn
    from ``pool`` (the other tasks' items, see :func:`replay_pool`) instead of ``tasks``.
    """
    rng = np.random.default_rng([seed, 141, len(tasks), sum(TASKS.index(t) for t in tasks)])
    if mode == "lora" and not is_lora(model.llm):
        raise ValueError("add LoRA to the model before training it in mode 'lora'")
    if replay and not pool:
        raise ValueError("replay > 0 needs a pool of the other tasks' items")
    params = llm_trainable(model, mode)
    head = model.branches["image"].projector
    head.requires_grad_(projector)
    if projector:
        params += list(head.parameters())
    if not params:
        raise ValueError("nothing to train: mode 'frozen' needs projector=True")
    n_text = int(round(batch * text_share))
    others = [t for t in TASKS if t not in tasks and t in (pool or {})]

    def image_items(n: int) -> list[CapabilityItem]:
        n_replay = int(rng.binomial(n, replay)) if others else 0
        drawn = [pool[others[i]][rng.integers(len(pool[others[i]]))] for i in rng.integers(0, len(others), n_replay)]
        return mixed_items(world, tasks, n - n_replay, rng) + drawn

    def next_batch(_: int) -> Batch:
        return capability_batch(model, image_items(batch - n_text), mixed_examples(world, rng, n_text, None, {}))

    return fit(model, params, next_batch, steps, lr, desc or f"{'+'.join(tasks)} ({mode})")


@torch.no_grad()
def replay_pool(world: World, n: int, seed: int, base: MLLM | None = None) -> dict[str, list[CapabilityItem]]:
    """``n`` training items per task, labelled with the gold answer or, given ``base``, with ``base``'s own
    greedy answer.

    Replaying the other tasks with the base's own answers keeps an expert's behaviour on them
    where the base had it, right or wrong, without teaching it those tasks (self-distillation).
    """
    rng = np.random.default_rng([seed, 151])
    pool = {}
    with torch.random.fork_rng():                     # leaves torch's random state as it was, for resumed builds
        for task in TASKS:
            items = [MAKERS[task](world, rng) for _ in range(n)]
            answers = capability_answers(base, items) if base is not None else [it.answer for it in items]
            pool[task] = [dataclasses.replace(it, answer=a) for it, a in zip(items, answers)]
    return pool


# --------------------------------------------------------------------------- build

@dataclass
class WorldParts:
    """What the experts take from a toy world: its entities, tokenizer and base LM (read into memory), the
    fingerprint of those two folders (the key of a resumable build) and the world's folder name."""

    world: World
    tokenizer: object
    base_llm: nn.Module
    fingerprint: str
    name: str

    @classmethod
    def read(cls, world: World, tokenizer_dir: Path, base_dir: Path, name: str) -> WorldParts:
        """The parts from a tokenizer and a base LM folder: a built world's, or a world build's finished stages."""
        fingerprint = "+".join(tree_fingerprint(d) for d in (tokenizer_dir, base_dir))
        return cls(world, load_tokenizer_dir(tokenizer_dir), load_llm(base_dir), fingerprint, name)

    @classmethod
    def of(cls, world_dir: str | Path | None = None) -> WorldParts:
        """The parts of a built world (default ``data/world``)."""
        from mckit.models.shipped import default_world_dir, load_world

        world_dir = Path(world_dir) if world_dir is not None else default_world_dir()
        return cls.read(load_world(world_dir), world_dir / "tokenizer", world_dir / "base", world_dir.name)


def build_experts(out: str | Path, world_dir: str | Path | WorldParts | None = None,
                  config: ExpertsConfig | None = None, overwrite: bool = False) -> dict:
    """Train the base MLLM, the five experts and the multi-task model in both regimes; write them atomically.

    ``world_dir``: the toy world they build on (default ``data/world``), or its :class:`WorldParts`.
    Resumable: every finished stage (the encoder, the base, each model) is kept in ``.{out}.stages``
    beside ``out`` (:class:`mckit.storage.stages.Stages`); rerun after an interruption, the build
    reuses them and restores torch's random state where each left it, so the result is the one an
    uninterrupted build gives.
    """
    cfg = config or ExpertsConfig()
    out = Path(out)
    check_replaceable(out, overwrite)                 # refuse before training, not after
    parts = world_dir if isinstance(world_dir, WorldParts) else WorldParts.of(world_dir)
    world, base_llm, tokenizer = parts.world, parts.base_llm, parts.tokenizer
    test = eval_items(world, "test", cfg.eval_items, cfg.seed)
    stages = Stages(out, {"config": asdict(cfg), "world": parts.fingerprint})
    record: dict = {"seed": cfg.seed, "config": asdict(cfg), "world": parts.name, "chance": CHANCE,
                    "seconds": {}, "models": {}}
    torch.manual_seed(cfg.seed)

    def encoder(path: Path) -> dict:
        branch = toy_branch("image", base_llm.config.hidden_size)
        heads = pretrain_general_encoder(branch.encoder, world, cfg.encoder_steps, cfg.encoder_batch, cfg.seed)
        path.mkdir()
        save_file(branch.state_dict(), str(path / "branch.safetensors"))
        return {"encoder_probe": probe_general_encoder(branch.encoder, heads, world, cfg.eval_items, cfg.seed)}

    run_stage(stages, "encoder", encoder, record)
    branch = load_branch(stages.path("encoder"), "image", base_llm.config.hidden_size)

    def base_stage(path: Path) -> dict:
        base = MLLM(copy.deepcopy(base_llm), tokenizer, {"image": branch})
        train_capabilities(base, world, TASKS, "frozen", cfg.stage1_steps, cfg.batch, 3e-3, cfg.seed, text_share=0.0,
                           projector=True, desc="base MLLM: projector alignment")
        train_capabilities(base, world, TASKS, "full", cfg.base_steps, cfg.batch, cfg.full_lr, cfg.seed + 1,
                           projector=True, desc="base MLLM: generalist instruction tuning")
        save_mllm(base, path)
        return {"models": {"base": evaluate_capabilities(base, test)}}

    run_stage(stages, "base", base_stage, record)
    theta_0 = load_stage(stages, "base")
    pool = replay_pool(world, cfg.replay_items, cfg.seed, theta_0 if cfg.replay_labels == "base" else None
                       ) if cfg.replay else None
    names = ["base"]
    jobs = [(t, (t,), cfg.expert_steps) for t in TASKS] + [(MULTITASK, TASKS, cfg.multitask_steps)]
    for name, tasks, steps in tqdm(jobs, desc="experts"):
        for regime in REGIMES:
            stage = f"models/{model_name(name, regime)}"
            run_stage(stages, stage, functools.partial(_train_model, theta_0, world, tasks, regime, steps, cfg, test,
                                                    stages.path("base") / "llm", model_name(name, regime), pool),
                      record)
            names.append(stage)
    record["seconds"]["total"] = round(sum(record["seconds"].values()), 1)
    with atomic_dir(out, overwrite) as tmp:
        stages.move_into(tmp, names)
        (tmp / "experts.json").write_text(json.dumps(record, indent=2))
    stages.remove()
    return record


def _train_model(theta_0: MLLM, world: World, tasks: tuple[str, ...], regime: str, steps: int, cfg: ExpertsConfig,
                 test: list[CapabilityItem], base_llm_dir: Path, name: str, pool: dict | None, path: Path) -> dict:
    """One expert (or the multi-task model): ``theta_0`` fine-tuned on ``tasks`` in ``regime``, saved at ``path``;
    an expert replays ``cfg.replay`` of the other tasks from ``pool``."""
    model = MLLM(copy.deepcopy(theta_0.llm), theta_0.tokenizer, {"image": copy.deepcopy(theta_0.branches["image"])})
    if regime == "lora":
        add_lora(model, rank=cfg.lora_rank)
    lr = cfg.full_lr if regime == "full" else cfg.lora_lr
    train_capabilities(model, world, tasks, regime, steps, cfg.batch, lr, cfg.seed, replay=cfg.replay, pool=pool)
    # LoRA adapters point at the base's LLM by a relative path, the same from the stage as from the output
    save_mllm(model, path, base_path=base_llm_dir if regime == "lora" else None)
    return {"models": {name: evaluate_capabilities(model, test)}}


# --------------------------------------------------------------------------- loading

def add_parser(sub) -> None:
    p = sub.add_parser("build-experts", help="train the capability experts of the merging benchmark")
    p.add_argument("--out", default=str(default_experts_dir()))
    p.add_argument("--world", default=None, help="toy world directory (default: data/world)")
    p.add_argument("--preset", default="full", choices=["full", "smoke"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    record = build_experts(args.out, args.world, ExpertsConfig.preset(args.preset), overwrite=args.overwrite)
    print(json.dumps({"seconds": record["seconds"], "encoder_probe": record["encoder_probe"]}, indent=1))
    for name, tasks in record["models"].items():
        print(name, {t: round(r["acc"], 3) for t, r in tasks.items()})
    return 0


