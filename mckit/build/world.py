"""Build the toy world end to end: encoders, tokenizer, base LM, and every single-modality MLLM.

``python -m mckit build-world --out data/world`` writes::

    world.json            seed, entities, build settings, wall times, held-out accuracies
    tokenizer/            word-level tokenizer
    base/                 the text-pretrained base LM (plain transformers checkpoint)
    models/{m}-stage1/    projector-only MLLM (frozen base LLM)
    models/{m}-lora/      stage 2 with LoRA on the seven linears
    models/{m}-full/      stage 2 with full fine-tuning of the seven linears
    models/{m}-frozen/    stage 2 with the LLM frozen (projector trained on the instruction data)

Everything is seeded. The shipped ``data/world`` was built by this command;
notebooks load it instead of retraining (see :mod:`mckit.models.shipped`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from mckit.eval.single import evaluate_single
from mckit.models.checkpoints import save_mllm
from mckit.models.encoders import pretrain_encoder, probe_accuracy
from mckit.models.mllm import MLLM, toy_branch
from mckit.models.training import (
    STAGE2_MODES,
    FeatureBank,
    Presets,
    add_lora,
    make_llm,
    pretrain_text,
    train_stage1,
    train_stage2,
)
from mckit.storage.atomic import atomic_dir, atomic_write_text, check_replaceable
from mckit.world.entities import MODALITIES, make_world
from mckit.world.render import TEST_RENDER_SEED, TRAIN_RENDER_SEED, render_bank
from mckit.world.tasks import corpus_words
from mckit.world.tokenizer import train_tokenizer


@dataclass
class BuildConfig(Presets):
    """Steps and sizes of every stage (``full``: the shipped world; ``smoke``: a fast pipeline check)."""

    seed: int = 0
    n_entities: int = 32
    modalities: tuple[str, ...] = MODALITIES
    encoder_steps: int = 500
    bank_per_entity: int = 64
    text_steps: int = 3200
    text_batch: int = 64
    stage1_steps: int = 1000
    stage2_steps: int = 300
    mllm_batch: int = 32
    lora_lr: float = 3e-3
    full_lr: float = 1e-3
    lora_rank: int = 32
    eval_items: int = 400
    hidden: int = 128
    layers: int = 4

    KIND: ClassVar[str] = "build"
    SMOKE: ClassVar[dict] = dict(encoder_steps=40, bank_per_entity=8, text_steps=60, stage1_steps=20,
                                 stage2_steps=30, eval_items=40, modalities=("image", "audio"))


def build_world(out: str | Path, config: BuildConfig | None = None, overwrite: bool = False) -> dict:
    """Train everything and write it to ``out`` atomically. Returns the ``world.json`` record."""
    cfg = config or BuildConfig()
    torch.manual_seed(cfg.seed)
    world = make_world(cfg.seed, cfg.n_entities)
    record: dict = {"seed": cfg.seed, "config": asdict(cfg), "entities": [
        {"name": e.name, **e.attrs} for e in world.entities], "seconds": {}, "encoders": {}, "models": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        record["seconds"][name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    with atomic_dir(Path(out), overwrite) as tmp:
        tokenizer = train_tokenizer(corpus_words(world))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        base = MLLM(make_llm(tokenizer, hidden=cfg.hidden, layers=cfg.layers, seed=cfg.seed), tokenizer, {})
        record["text_loss"] = float(np.mean(pretrain_text(base, world, cfg.text_steps, cfg.text_batch, seed=cfg.seed)[-20:]))
        base.llm.save_pretrained(str(tmp / "base"))
        lap("text_pretraining")

        for mod in tqdm(cfg.modalities, desc="modalities"):
            branch = toy_branch(mod, cfg.hidden)
            train = render_bank(mod, world, cfg.bank_per_entity, TRAIN_RENDER_SEED)
            test = render_bank(mod, world, max(4, cfg.bank_per_entity // 4), TEST_RENDER_SEED)
            _, heads = pretrain_encoder(branch.encoder, *(torch.from_numpy(train[k]) for k in ("x", "entity", "level")),
                                        n_entities=cfg.n_entities, steps=cfg.encoder_steps, seed=cfg.seed,
                                        desc=f"{mod} encoder")
            record["encoders"][mod] = probe_accuracy(branch.encoder, heads,
                                                     *(torch.from_numpy(test[k]) for k in ("x", "entity", "level")))
            train_bank, test_bank = FeatureBank(branch, train), FeatureBank(branch, test)
            lap(f"{mod}_encoder")

            stage1 = MLLM(copy.deepcopy(base.llm), tokenizer, {mod: branch})
            train_stage1(stage1, mod, world, train_bank, cfg.stage1_steps, cfg.mllm_batch, seed=cfg.seed)
            save_mllm(stage1, tmp / "models" / f"{mod}-stage1", base_path=tmp / "base")
            record["models"][f"{mod}-stage1"] = evaluate_single(stage1, world, mod, test_bank, cfg.eval_items, cfg.seed)
            lap(f"{mod}_stage1")

            for mode in STAGE2_MODES:
                model = MLLM(copy.deepcopy(base.llm), tokenizer, {mod: copy.deepcopy(branch)})
                if mode == "lora":
                    add_lora(model, rank=cfg.lora_rank)
                model.branches[mod].projector.load_state_dict(stage1.branches[mod].projector.state_dict())
                lr = {"lora": cfg.lora_lr, "full": cfg.full_lr, "frozen": cfg.lora_lr}[mode]
                train_stage2(model, mod, world, train_bank, mode, cfg.stage2_steps, cfg.mllm_batch, lr, seed=cfg.seed)
                save_mllm(model, tmp / "models" / f"{mod}-{mode}", base_path=None if mode == "full" else tmp / "base")
                record["models"][f"{mod}-{mode}"] = evaluate_single(model, world, mod, test_bank, cfg.eval_items,
                                                                    cfg.seed)
                lap(f"{mod}_{mode}")
        record["seconds"]["total"] = round(sum(record["seconds"].values()), 1)
        (tmp / "world.json").write_text(json.dumps(record, indent=2))
    return record


def train_replicas(world_dir: str | Path, seeds: list[int], variant: str = "lora", overwrite: bool = False) -> dict:
    """Retrain every modality's stage 2 (``variant``) with other training seeds: ``models/{m}-{variant}-s{seed}``.

    Same encoder, base LLM, stage-1 projector and settings as the world (``world.json``);
    only the stage-2 seed (data order, LoRA init, dropout) differs, so the spread across
    replicas is the training noise of the single-modality models. Returns and writes
    ``replicas.json`` (held-out accuracies per replica, wall times).
    """
    from mckit.models.checkpoints import load_mllm
    from mckit.models.shipped import load_base, load_world, model_dir_name, world_record

    if 0 in seeds:
        raise ValueError("seed 0 is the world's own training seed; replicas need other seeds")
    world_dir = Path(world_dir)
    rec = world_record(world_dir)
    cfg = BuildConfig(**{**rec["config"], "modalities": tuple(rec["config"]["modalities"])})
    for mod in cfg.modalities:                    # refuse before hours of training, not after
        for seed in seeds:
            check_replaceable(world_dir / "models" / model_dir_name(mod, variant, seed), overwrite)
    world, base_llm = load_world(world_dir), load_base(world_dir)
    record_file = world_dir / "replicas.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"models": {}, "seconds": {}}
    for mod in tqdm(cfg.modalities, desc="replicas"):
        stage1 = load_mllm(world_dir / "models" / f"{mod}-stage1")
        branch = stage1.branches[mod]
        train = FeatureBank(branch, render_bank(mod, world, cfg.bank_per_entity, TRAIN_RENDER_SEED))
        test = FeatureBank(branch, render_bank(mod, world, max(4, cfg.bank_per_entity // 4), TEST_RENDER_SEED))
        for seed in seeds:
            name = model_dir_name(mod, variant, seed)
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = MLLM(copy.deepcopy(base_llm), stage1.tokenizer, {mod: copy.deepcopy(branch)})
            if variant == "lora":
                add_lora(model, rank=cfg.lora_rank)
            lr = cfg.full_lr if variant == "full" else cfg.lora_lr
            train_stage2(model, mod, world, train, variant, cfg.stage2_steps, cfg.mllm_batch, lr, seed=seed)
            save_mllm(model, world_dir / "models" / name, base_path=None if variant == "full" else world_dir / "base",
                      overwrite=overwrite)
            record["models"][name] = evaluate_single(model, world, mod, test, cfg.eval_items, cfg.seed)
            record["seconds"][name] = round(time.perf_counter() - start, 1)
    atomic_write_text(record_file, json.dumps(record, indent=2))
    return record


def add_parser(sub) -> None:
    p = sub.add_parser("build-world", help="train the toy world's encoders, base LM and MLLMs")
    p.add_argument("--out", default="data/world", help="output directory (default: data/world)")
    p.add_argument("--preset", default="full", choices=["full", "smoke"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run)


def add_replicas_parser(sub) -> None:
    p = sub.add_parser("build-seeds", help="retrain the stage-2 models with other training seeds (replicas)")
    p.add_argument("--world", default="data/world", help="toy world directory (default: data/world)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variant", default="lora", choices=["lora", "full"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda args: train_replicas(args.world, args.seeds, args.variant, args.overwrite) and 0)


def _run(args) -> int:
    cfg = BuildConfig.preset(args.preset)
    cfg.seed = args.seed
    record = build_world(args.out, cfg, overwrite=args.overwrite)
    print(json.dumps({"seconds": record["seconds"], "encoders": record["encoders"]}, indent=1))
    for name, tasks in record["models"].items():
        print(name, {t: round(r["acc"], 3) for t, r in tasks.items()})
    return 0
