"""Anatomy of an MLLM: parameter counts per part (encoders, projectors, LLM embeddings, linears, LoRA)."""

from __future__ import annotations

import pandas as pd

from mckit.models.lora import is_lora, is_lora_parameter
from mckit.models.mllm import MLLM
from mckit.models.shipped import VARIANTS


def _count(params) -> int:
    return sum(p.numel() for p in params)


def anatomy(model: MLLM, variant: str | None = None) -> pd.DataFrame:
    """Parameter counts per part: encoders, projectors, LLM embeddings / linears / norms / head, LoRA.

    ``trainable`` reports what training of ``variant`` updated (stage1: projector;
    lora: projector + LoRA; full: projector + the seven linears), not the loaded
    model's flags, which are all frozen at inference. Default: lora if the model
    has LoRA, else full.
    """
    variant = variant or ("lora" if is_lora(model.llm) else "full")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    rows = []
    for mod, branch in model.branches.items():
        rows.append({"part": f"{mod} encoder", "params": _count(branch.encoder.parameters()), "trainable": 0})
        n = _count(branch.projector.parameters())
        rows.append({"part": f"{mod} projector ({branch.projector_type})", "params": n, "trainable": n})
    groups: dict[str, list[int]] = {}
    for name, p in model.llm.named_parameters():
        if is_lora_parameter(name):
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
