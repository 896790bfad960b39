"""Task vectors of MLLMs: tau = theta_model - theta_0 per LLM weight, and their norms.

For LoRA models tau is the product dW = (alpha / r) * B A of each adapted linear
(never A and B separately); for full fine-tuning, the difference of the weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from mckit.models.checkpoints import CheckpointError
from mckit.models.decoupled import is_decoupled
from mckit.models.lora import ADAPTER, is_lora, lora_layers
from mckit.models.mllm import MLLM
from mckit.models.shipped import load_base, load_model, world_record

LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


def lora_deltas(model: MLLM) -> dict[str, torch.Tensor]:
    """Per adapted linear, the LoRA update dW = (alpha / r) * B @ A (float32), keyed by its weight name."""
    return {name: module.get_delta_weight(ADAPTER).float() for name, module in lora_layers(model.llm)}


def task_vector(model: MLLM, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """tau = theta_model - theta_0 per LLM weight that the model changed (float32).

    For LoRA models this is the product dW = scale * B A per adapted linear (never A
    and B separately); for full fine-tuning, the difference of the weights (unchanged
    weights are left out). Raises :class:`CheckpointError` naming the tensor if the
    model was not built on ``base``.
    """
    if is_decoupled(model.llm):
        raise CheckpointError("this model is decoupled (a text and a modality LoRA, routed per token): it has no "
                              "single task vector; take its deltas with mckit.models.decoupled.decoupled_deltas")
    lora = is_lora(model.llm)
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


def task_vector_summary(*norms: pd.DataFrame) -> pd.DataFrame:
    """Total ||tau|| (root of summed squares over linears) per model, from :func:`task_vector_norms` tables."""
    df = pd.concat(norms, ignore_index=True)
    return (df.assign(sq=df["norm"] ** 2).groupby("model", sort=False)["sq"].sum() ** 0.5).rename(
        "total_norm").reset_index()
