"""Build the toy world end to end: encoders, tokenizer, base LM, and every single-modality MLLM.

``python -m mckit build-world --out data/world`` writes::

    world.json            seed, entities, build settings, wall times, held-out accuracies (the base
                          LM's letter binding under ``binding``)
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mckit.build.staging import load_branch, load_stage, run_stage
from mckit.eval.single import evaluate_binding, evaluate_single
from mckit.models.checkpoints import load_llm, load_tokenizer_dir, save_mllm
from mckit.models.decoupled import decouple
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
from mckit.storage.stages import Stages
from mckit.world.entities import MODALITIES, World, make_world
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
    drill_steps: int = 1000
    text_steps: int = 3000
    text_batch: int = 64
    text_lr: float = 1e-3
    drill_share: float = 0.2
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
    SMOKE: ClassVar[dict] = dict(encoder_steps=40, bank_per_entity=8, drill_steps=10, text_steps=60, stage1_steps=20,
                                 stage2_steps=30, eval_items=40, modalities=("image", "audio"))


def build_world(out: str | Path, config: BuildConfig | None = None, overwrite: bool = False,
                after_base: Callable[[World, Path, Path], None] | None = None) -> dict:
    """Train everything and write it to ``out`` atomically. Returns the ``world.json`` record.

    Resumable: every finished stage (tokenizer, base LM, each encoder, each MLLM) is kept in
    ``.{out}.stages`` beside ``out`` (:class:`mckit.storage.stages.Stages`); rerun after an
    interruption, the build reuses them and restores torch's random state where each left it.
    ``after_base(world, tokenizer_dir, base_dir)`` is called once the base LM exists, before the
    modalities' stages (what builds on the base alone can start then, e.g. the capability experts).
    """
    cfg = config or BuildConfig()
    out = Path(out)
    check_replaceable(out, overwrite)                 # refuse before training, not after
    torch.manual_seed(cfg.seed)
    world = make_world(cfg.seed, cfg.n_entities)
    record: dict = {"seed": cfg.seed, "config": asdict(cfg), "entities": [
        {"name": e.name, **e.attrs} for e in world.entities], "seconds": {}, "encoders": {}, "models": {}}
    stages = Stages(out, {"config": asdict(cfg)})

    def tokenizer_stage(path: Path) -> dict:
        train_tokenizer(corpus_words(world)).save_pretrained(str(path))
        return {}

    run_stage(stages, "tokenizer", tokenizer_stage, record)
    tokenizer = load_tokenizer_dir(stages.path("tokenizer"))

    def base_stage(path: Path) -> dict:
        base = MLLM(make_llm(tokenizer, hidden=cfg.hidden, layers=cfg.layers, seed=cfg.seed), tokenizer, {})
        losses = pretrain_text(base, world, cfg.text_steps, cfg.text_batch, cfg.text_lr, cfg.seed,
                               cfg.drill_steps, cfg.drill_share)
        base.llm.save_pretrained(str(path))
        return {"text_loss": float(np.mean(losses[-20:])),
                "binding": evaluate_binding(base, world, cfg.eval_items, cfg.seed)}

    run_stage(stages, "base", base_stage, record, label="text_pretraining")
    if after_base is not None:
        with torch.random.fork_rng():
            after_base(world, stages.path("tokenizer"), stages.path("base"))
    with torch.random.fork_rng():
        base_llm = load_llm(stages.path("base"))
    names = ["tokenizer", "base"]
    for mod in tqdm(cfg.modalities, desc="modalities"):
        names += _build_modality(stages, mod, world, base_llm, tokenizer, cfg, record)
    record["seconds"]["total"] = round(sum(record["seconds"].values()), 1)
    with atomic_dir(out, overwrite) as tmp:
        stages.move_into(tmp, names)
        (tmp / "world.json").write_text(json.dumps(record, indent=2))
    stages.remove()
    return record


def _build_modality(stages: Stages, mod: str, world: World, base_llm, tokenizer, cfg: BuildConfig,
                    record: dict) -> list[str]:
    """One modality's stages: its encoder, its stage-1 MLLM, then one stage-2 MLLM per mode; their stage names."""
    train = render_bank(mod, world, cfg.bank_per_entity, TRAIN_RENDER_SEED)
    test = render_bank(mod, world, max(4, cfg.bank_per_entity // 4), TEST_RENDER_SEED)

    def encoder(path: Path) -> dict:
        branch = toy_branch(mod, cfg.hidden)
        _, heads = pretrain_encoder(branch.encoder, *(torch.from_numpy(train[k]) for k in ("x", "entity", "level")),
                                    n_entities=cfg.n_entities, steps=cfg.encoder_steps, seed=cfg.seed,
                                    desc=f"{mod} encoder")
        path.mkdir()
        save_file(branch.state_dict(), str(path / "branch.safetensors"))
        return {"encoders": {mod: probe_accuracy(branch.encoder, heads,
                                                 *(torch.from_numpy(test[k]) for k in ("x", "entity", "level")))}}

    run_stage(stages, f"encoders/{mod}", encoder, record, label=f"{mod}_encoder")
    branch = load_branch(stages.path(f"encoders/{mod}"), mod, cfg.hidden)
    train_bank, test_bank = FeatureBank(branch, train), FeatureBank(branch, test)

    def stage1_stage(path: Path) -> dict:
        stage1 = MLLM(copy.deepcopy(base_llm), tokenizer, {mod: branch})
        train_stage1(stage1, mod, world, train_bank, cfg.stage1_steps, cfg.mllm_batch, seed=cfg.seed)
        save_mllm(stage1, path, base_path=stages.path("base"))
        return {"models": {f"{mod}-stage1": evaluate_single(stage1, world, mod, test_bank, cfg.eval_items, cfg.seed)}}

    run_stage(stages, f"models/{mod}-stage1", stage1_stage, record, label=f"{mod}_stage1")
    aligned = load_stage(stages, f"models/{mod}-stage1").branches[mod]
    for mode in STAGE2_MODES:
        def stage2(path: Path, mode: str = mode) -> dict:
            model = MLLM(copy.deepcopy(base_llm), tokenizer, {mod: copy.deepcopy(aligned)})
            if mode == "lora":
                add_lora(model, rank=cfg.lora_rank)
            lr = {"lora": cfg.lora_lr, "full": cfg.full_lr, "frozen": cfg.lora_lr}[mode]
            train_stage2(model, mod, world, train_bank, mode, cfg.stage2_steps, cfg.mllm_batch, lr, seed=cfg.seed)
            save_mllm(model, path, base_path=None if mode == "full" else stages.path("base"))
            return {"models": {f"{mod}-{mode}": evaluate_single(model, world, mod, test_bank, cfg.eval_items,
                                                                cfg.seed)}}

        run_stage(stages, f"models/{mod}-{mode}", stage2, record, label=f"{mod}_{mode}")
    return [f"models/{mod}-{variant}" for variant in ("stage1", *STAGE2_MODES)]


def train_replicas(world_dir: str | Path, seeds: list[int], variant: str = "lora", overwrite: bool = False) -> dict:
    """Retrain every modality's stage 2 (``variant``) with other training seeds: ``models/{m}-{variant}-s{seed}``.

    Same encoder, base LLM, stage-1 projector and settings as the world (``world.json``);
    only the stage-2 seed (data order, LoRA init, dropout) differs, so the spread across
    replicas is the training noise of the single-modality models. Returns and writes
    ``replicas.json`` (held-out accuracies per replica, wall times).
    """
    from mckit.models.checkpoints import load_mllm
    from mckit.models.shipped import DECOUPLED, load_base, load_world, model_dir_name, world_record

    if 0 in seeds and variant != DECOUPLED:
        raise ValueError("seed 0 is the world's own training seed; replicas need other seeds")
    world_dir = Path(world_dir)
    rec = world_record(world_dir)
    cfg = BuildConfig(**{**rec["config"], "modalities": tuple(rec["config"]["modalities"])})
    record_file = world_dir / "replicas.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"models": {}, "seconds": {}}
    todo = {mod: [s for s in seeds if overwrite or not _replica_done(world_dir, record, mod, variant, s)]
            for mod in cfg.modalities}
    for mod, mod_seeds in todo.items():           # refuse before hours of training, not after
        for seed in mod_seeds:
            check_replaceable(world_dir / "models" / model_dir_name(mod, variant, seed), overwrite)
    world, base_llm = load_world(world_dir), load_base(world_dir)
    for mod in tqdm([m for m in cfg.modalities if todo[m]], desc="replicas"):
        stage1 = load_mllm(world_dir / "models" / f"{mod}-stage1")
        branch = stage1.branches[mod]
        train = FeatureBank(branch, render_bank(mod, world, cfg.bank_per_entity, TRAIN_RENDER_SEED))
        test = FeatureBank(branch, render_bank(mod, world, max(4, cfg.bank_per_entity // 4), TEST_RENDER_SEED))
        for seed in todo[mod]:
            name = model_dir_name(mod, variant, seed)
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = MLLM(copy.deepcopy(base_llm), stage1.tokenizer, {mod: copy.deepcopy(branch)})
            if variant == "lora":
                add_lora(model, rank=cfg.lora_rank)
            if variant == DECOUPLED:
                model = decouple(model, rank=cfg.lora_rank)
            lr = cfg.full_lr if variant == "full" else cfg.lora_lr
            train_stage2(model, mod, world, train, variant, cfg.stage2_steps, cfg.mllm_batch, lr, seed=seed)
            save_mllm(model, world_dir / "models" / name, base_path=None if variant == "full" else world_dir / "base",
                      overwrite=overwrite)
            record = _add_replica(record_file, name, evaluate_single(model, world, mod, test, cfg.eval_items, cfg.seed),
                                  round(time.perf_counter() - start, 1))
    return record


def _add_replica(record_file: Path, name: str, result: dict, seconds: float) -> dict:
    """Add one model's held-out result to ``replicas.json`` as it finishes; builds of other seeds may run at the
    same time, so the file is read, merged and rewritten (atomically) under an exclusive lock."""
    import fcntl

    with open(record_file.with_name(f".{record_file.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(record_file.read_text()) if record_file.is_file() else {"models": {}, "seconds": {}}
        record["models"][name], record["seconds"][name] = result, seconds
        atomic_write_text(record_file, json.dumps(record, indent=2))
    return record


def _replica_done(world_dir: Path, record: dict, mod: str, variant: str, seed: int) -> bool:
    """Whether a replica was built and recorded by an earlier (possibly interrupted) run."""
    from mckit.models.shipped import model_dir_name

    name = model_dir_name(mod, variant, seed)
    return name in record["models"] and (world_dir / "models" / name / "mllm.json").is_file()


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
    p.add_argument("--variant", default="lora", choices=["lora", "full", "decoupled"],
                   help="decoupled: DAMC's text + modality LoRAs (seed 0 included: the world has none)")
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
