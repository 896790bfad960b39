"""The shipped models: load the toy world's and the capability experts', and read their build records.

``data/world`` (built by ``python -m mckit build-world``) holds a base LM and,
per modality, four MLLMs: ``stage1`` (projector only), ``frozen``, ``lora`` and
``full``. ``data/experts`` (``python -m mckit build-experts``) holds the merging
benchmark's base MLLM, five experts and a multi-task model per regime.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mckit.models.checkpoints import CheckpointError, load_llm, load_mllm
from mckit.models.mllm import MLLM
from mckit.storage.paths import DATA_DIR
from mckit.world.capabilities import TASKS
from mckit.world.entities import World, make_world

VARIANTS = ("stage1", "frozen", "lora", "full")
#: DAMC's decoupled variant (a text and a modality LoRA, routed per token), built after the world
#: (``python -m mckit build-seeds --variant decoupled --seeds 0 1 2``) on its stage-1 models.
DECOUPLED = "decoupled"


def default_world_dir() -> Path:
    """``data/world`` of the repository this package lives in."""
    return DATA_DIR / "world"


def _dir(path: str | Path | None) -> Path:
    path = Path(path) if path is not None else default_world_dir()
    if not (path / "world.json").is_file():
        raise FileNotFoundError(f"no toy world at {path}: build it with `python -m mckit build-world --out {path}`")
    return path


def world_record(path: str | Path | None = None) -> dict:
    """The ``world.json`` record: seed, entities, build settings, wall times, accuracies."""
    return json.loads((_dir(path) / "world.json").read_text())


def load_world(path: str | Path | None = None) -> World:
    """The :class:`World` the checkpoints were trained on (rebuilt from its seed, then checked)."""
    rec = world_record(path)
    world = make_world(rec["seed"], len(rec["entities"]))
    if world.names != [e["name"] for e in rec["entities"]]:
        raise CheckpointError(f"{_dir(path)}/world.json does not match make_world(seed={rec['seed']})")
    return world


def load_base(path: str | Path | None = None):
    """The text-pretrained base LM (theta_0), a plain transformers model."""
    return load_llm(_dir(path) / "base")


def load_tokenizer(path: str | Path | None = None):
    """The world's word-level tokenizer (shared by every model built on the world)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(_dir(path) / "tokenizer"))


def load_text_model(path: str | Path | None = None) -> MLLM:
    """The base LM as an MLLM without branches (text only), with the world's tokenizer."""
    return MLLM(load_base(path), load_tokenizer(path), {}).eval()


def model_dir_name(modality: str, variant: str, seed: int = 0) -> str:
    """``{modality}-{variant}`` for the world's own training seed (0), ``{modality}-{variant}-s{seed}`` otherwise."""
    return f"{modality}-{variant}" if seed == 0 else f"{modality}-{variant}-s{seed}"


def load_model(modality: str, variant: str = "full", path: str | Path | None = None, seed: int = 0) -> MLLM:
    """One single-modality MLLM of the shipped world: ``variant`` in stage1 | frozen | lora | full | decoupled.

    ``seed`` > 0 picks a stage-2 replica trained with another seed (``python -m mckit build-seeds``).
    """
    if variant not in (*VARIANTS, DECOUPLED):
        raise ValueError(f"unknown variant {variant!r}; expected one of {(*VARIANTS, DECOUPLED)}")
    ckpt = _dir(path) / "models" / model_dir_name(modality, variant, seed)
    if not ckpt.is_dir():
        hint = (f" (build it with `python -m mckit build-seeds --variant {variant} --seeds {seed}`)"
                if seed or variant == DECOUPLED else "")
        raise FileNotFoundError(f"no {variant} model for modality {modality!r} and seed {seed} at {ckpt}{hint}")
    return load_mllm(ckpt)


def has_model(modality: str, variant: str, path: str | Path | None = None, seed: int = 0) -> bool:
    """Whether the world holds the ``variant`` model of ``modality`` for training ``seed``."""
    return (_dir(path) / "models" / model_dir_name(modality, variant, seed) / "mllm.json").is_file()


def replicas_record(path: str | Path | None = None) -> dict:
    """``replicas.json``: held-out accuracies and wall times of the models built after the world (empty if none)."""
    file = _dir(path) / "replicas.json"
    return json.loads(file.read_text()) if file.is_file() else {"models": {}, "seconds": {}}


def replica_seeds(variant: str = "lora", path: str | Path | None = None) -> list[int]:
    """Training seeds with a complete set of ``variant`` models in the world: 0 and every built replica."""
    models = _dir(path) / "models"
    seeds = {0}
    for d in models.glob(f"*-{variant}-s*"):
        seeds.add(int(d.name.rsplit("-s", 1)[1]))
    mods = {d.name.split("-")[0] for d in models.glob(f"*-{variant}")}
    return sorted(s for s in seeds if all((models / model_dir_name(m, variant, s)).is_dir() for m in mods))


def accuracy_table(record: dict) -> pd.DataFrame:
    """Held-out accuracies measured when the world was built: model, modality, variant, task, acc, n, chance."""
    rows = []
    for name, tasks in record["models"].items():
        mod, variant = name.rsplit("-", 1)
        for task, r in tasks.items():
            rows.append({"model": name, "modality": mod, "variant": variant, "task": task, "acc": r["acc"],
                         "ci_low": r["ci95"][0], "ci_high": r["ci95"][1], "n": r["n"], "chance": r["chance"]})
    return pd.DataFrame(rows)


REGIMES = ("full", "lora")


MULTITASK = "multitask"


def default_experts_dir() -> Path:
    """``data/experts`` of the repository this package lives in."""
    return DATA_DIR / "experts"


def model_name(task: str, regime: str) -> str:
    """Directory name of an expert (``task`` in TASKS) or of the multi-task model (``task="multitask"``)."""
    return f"{task}-{regime}"


def experts_record(path: str | Path | None = None) -> dict:
    """The ``experts.json`` record of a built experts directory."""
    path = Path(path) if path is not None else default_experts_dir()
    if not (path / "experts.json").is_file():
        raise FileNotFoundError(f"no capability experts at {path}: build them with `python -m mckit build-experts`")
    return json.loads((path / "experts.json").read_text())


def load_expert(name: str, regime: str, path: str | Path | None = None) -> MLLM:
    """An expert (``name`` in TASKS), the multi-task model (``"multitask"``) or the base (``"base"``)."""
    path = Path(path) if path is not None else default_experts_dir()
    experts_record(path)
    if name == "base":
        return load_mllm(path / "base")
    if name not in (*TASKS, MULTITASK) or regime not in REGIMES:
        raise ValueError(f"unknown expert {name!r}/{regime!r}; expected a task of {TASKS} or {MULTITASK!r}, "
                         f"and a regime of {REGIMES}")
    return load_mllm(path / "models" / model_name(name, regime))


def record_frame(record: dict) -> "pd.DataFrame":
    """Held-out accuracy of every built model (rows) on every task (columns) from ``experts.json``."""
    import pandas as pd

    return pd.DataFrame({name: {t: r["acc"] for t, r in tasks.items()} for name, tasks in record["models"].items()}).T
