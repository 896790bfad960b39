"""The shipped toy world: load its models, inspect their anatomy, compute task vectors.

``data/world`` (built by ``python -m mckit build-world``) holds a base LM and,
per modality, three MLLMs: ``stage1`` (projector only), ``lora`` and ``full``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import torch

from .checkpoint import CheckpointError, load_llm, load_mllm
from .mllm import MLLM
from .world import World, make_world

VARIANTS = ("stage1", "frozen", "lora", "full")
LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


def default_world_dir() -> Path:
    """``data/world`` of the repository this package lives in."""
    return Path(__file__).resolve().parent.parent / "data" / "world"


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
    """One single-modality MLLM of the shipped world: ``variant`` in stage1 | frozen | lora | full.

    ``seed`` > 0 picks a stage-2 replica trained with another seed (``python -m mckit build-seeds``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    ckpt = _dir(path) / "models" / model_dir_name(modality, variant, seed)
    if not ckpt.is_dir():
        hint = " (build it with `python -m mckit build-seeds`)" if seed else ""
        raise FileNotFoundError(f"no {variant} model for modality {modality!r} and seed {seed} at {ckpt}{hint}")
    return load_mllm(ckpt)


def replica_seeds(variant: str = "lora", path: str | Path | None = None) -> list[int]:
    """Training seeds with a complete set of ``variant`` models in the world: 0 and every built replica."""
    models = _dir(path) / "models"
    seeds = {0}
    for d in models.glob(f"*-{variant}-s*"):
        seeds.add(int(d.name.rsplit("-s", 1)[1]))
    mods = {d.name.split("-")[0] for d in models.glob(f"*-{variant}")}
    return sorted(s for s in seeds if all((models / model_dir_name(m, variant, s)).is_dir() for m in mods))


def lora_deltas(model: MLLM) -> dict[str, torch.Tensor]:
    """Per adapted linear, the LoRA update dW = (alpha / r) * B @ A (float32), keyed by its weight name."""
    out = {}
    for name, module in model.llm.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = module.get_delta_weight("default").float()
    return out


def task_vector(model: MLLM, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """tau = theta_model - theta_0 per LLM weight that the model changed (float32).

    For LoRA models this is the product dW = scale * B A per adapted linear (never A
    and B separately); for full fine-tuning, the difference of the weights (unchanged
    weights are left out). Raises :class:`CheckpointError` naming the tensor if the
    model was not built on ``base``.
    """
    lora = hasattr(model.llm, "peft_config")
    weights = lora_deltas(model) if lora else dict(model.llm.state_dict())
    ref = base.state_dict()
    tau = {}
    for name, w in weights.items():
        if name not in ref:
            raise CheckpointError(f"tensor {name!r} is not in the base LLM: was this model built on another base?")
        if w.shape != ref[name].shape:
            raise CheckpointError(f"tensor {name!r}: model shape {tuple(w.shape)} != base shape "
                                  f"{tuple(ref[name].shape)}: the model was built on another base")
        delta = w.float() if lora else w.float() - ref[name].float()
        if lora or delta.abs().max() > 0:
            tau[name] = delta
    return tau


def layer_norms(tau: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Frobenius norm of each linear's task vector: columns layer, module, norm."""
    rows = []
    for name, t in tau.items():
        m = LAYER.search(name)
        if m:
            rows.append({"layer": int(m.group(1)), "module": m.group(2), "norm": t.norm().item()})
    return pd.DataFrame(rows)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def anatomy(model: MLLM, variant: str | None = None) -> pd.DataFrame:
    """Parameter counts per part: encoders, projectors, LLM embeddings / linears / norms / head, LoRA.

    ``trainable`` reports what training of ``variant`` updated (stage1: projector;
    lora: projector + LoRA; full: projector + the seven linears), not the loaded
    model's flags, which are all frozen at inference. Default: lora if the model
    has LoRA, else full.
    """
    variant = variant or ("lora" if hasattr(model.llm, "peft_config") else "full")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    rows = []
    for mod, branch in model.branches.items():
        rows.append({"part": f"{mod} encoder", "params": _count(branch.encoder.parameters()), "trainable": 0})
        n = _count(branch.projector.parameters())
        rows.append({"part": f"{mod} projector ({branch.projector_type})", "params": n, "trainable": n})
    groups: dict[str, list[int]] = {}
    for name, p in model.llm.named_parameters():
        if "lora_" in name:
            part = "LLM LoRA (B, A)"
        elif "embed_tokens" in name:
            part = "LLM embeddings"
        elif "lm_head" in name:
            part = "LLM lm_head"
        elif "norm" in name:
            part = "LLM norms"
        else:
            part = "LLM linears (q,k,v,o,gate,up,down)"
        trainable = (part == "LLM LoRA (B, A)") or (part.startswith("LLM linears") and variant == "full")
        g = groups.setdefault(part, [0, 0])
        g[0] += p.numel()
        g[1] += p.numel() if trainable else 0
    rows += [{"part": k, "params": v[0], "trainable": v[1]} for k, v in groups.items()]
    df = pd.DataFrame(rows)
    df["frozen"] = df["params"] - df["trainable"]
    return df


def ask(model: MLLM, world: World, modality: str, entity: str, question: str, level: str = "high",
        seed: int = 0) -> dict:
    """Render ``entity`` in ``modality``, ask ``question`` about it, and return the exchange."""
    import numpy as np

    from .render import render
    from .tasks import chat

    x = render(modality, world, world.by_name(entity), level, np.random.default_rng(seed))
    prompt = chat(f"{modality} : <{modality}> {question}")
    return {"input": x, "prompt": prompt, "answer": model.answer([prompt], [{modality: [x]}])[0],
            "entity": world.by_name(entity).attrs | {"name": entity, "level": level}}


def evaluate_model(model: MLLM, world: World, modality: str, n: int = 200, seed: int = 0) -> pd.DataFrame:
    """Held-out single-modality accuracy of ``model`` on fresh renders: task, acc, ci95, n, chance."""
    from .build import TEST_RENDER_SEED, evaluate_single
    from .render import render_bank
    from .train import FeatureBank

    bank = FeatureBank(model.branches[modality], render_bank(modality, world, 8, TEST_RENDER_SEED + 100 * seed))
    result = evaluate_single(model, world, modality, bank, n, seed)
    return pd.DataFrame([{"task": t, **r} for t, r in result.items()])


def accuracy_table(record: dict) -> pd.DataFrame:
    """Held-out accuracies measured when the world was built: model, modality, variant, task, acc, n, chance."""
    rows = []
    for name, tasks in record["models"].items():
        mod, variant = name.rsplit("-", 1)
        for task, r in tasks.items():
            rows.append({"model": name, "modality": mod, "variant": variant, "task": task, "acc": r["acc"],
                         "ci_low": r["ci95"][0], "ci_high": r["ci95"][1], "n": r["n"], "chance": r["chance"]})
    return pd.DataFrame(rows)


def task_vector_norms(variant: str = "full", path: str | Path | None = None,
                      modalities: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Per modality's ``variant`` model: ||tau|| per layer and linear (columns model, layer, module, norm)."""
    base = load_base(path)
    mods = modalities or tuple(world_record(path)["config"]["modalities"])
    frames = []
    for mod in mods:
        df = layer_norms(task_vector(load_model(mod, variant, path), base))
        df.insert(0, "model", f"{mod}-{variant}")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def resolve_mode(mode: str) -> str:
    """Notebook ``MODE``: "auto" means "full" on a GPU and "smoke" (toy scale) on a CPU."""
    if mode not in ("auto", "smoke", "full"):
        raise ValueError(f"MODE must be 'auto', 'smoke' or 'full', got {mode!r}")
    if mode == "auto":
        return "full" if torch.cuda.is_available() else "smoke"
    return mode


def example_prompts(world: World, seed: int = 0) -> pd.DataFrame:
    """One generated item per task and modality (and text): what the models are trained on."""
    import numpy as np

    from .tasks import MODALITY_TASKS, TEXT_TASKS, Slots
    from .world import MODALITIES

    rng = np.random.default_rng(seed)
    rows = [{"modality": "text", "task": t, **_item(f(world, rng, Slots(None, rng)))} for t, f in TEXT_TASKS.items()]
    for mod in MODALITIES:
        rows += [{"modality": mod, "task": t, **_item(f(world, rng, Slots(mod, rng)))}
                 for t, f in MODALITY_TASKS.items()]
    return pd.DataFrame(rows)


def _item(ex) -> dict:
    return {"prompt": ex.prompt, "answer": ex.answer}


def attribute_counts(world: World) -> pd.DataFrame:
    """How many entities hold each value, per family (rows: value rank, columns: family)."""
    df = pd.DataFrame([e.attrs for e in world.entities])
    return pd.DataFrame({f: df[f].value_counts().sort_index().to_numpy() for f in df.columns})


def task_vector_summary(*norms: pd.DataFrame) -> pd.DataFrame:
    """Total ||tau|| (root of summed squares over linears) per model, from :func:`task_vector_norms` tables."""
    df = pd.concat(norms, ignore_index=True)
    return (df.assign(sq=df["norm"] ** 2).groupby("model", sort=False)["sq"].sum() ** 0.5).rename(
        "total_norm").reset_index()


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Binder's limit is about 2 GB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)
