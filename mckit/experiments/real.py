"""Notebook 07's steps on real checkpoints: resolve hub ids or folders, describe the sources, plan the memory,
compose, evaluate on MCUB files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from mckit.compose.checkpoints import (
    compose_checkpoints,
    composed_preprocessors,
    load_composed,
    parse_source,
)
from mckit.eval.mcub_reader import load_split
from mckit.eval.real import VICUNA_V1, evaluate_real
from mckit.models.families import FAMILIES, read_config, text_signature
from mckit.storage.tensorfiles import Checkpoint


def resolve(spec: str) -> str:
    """``ID|DIR[:modalities]`` with a hub id replaced by its local snapshot (``huggingface_hub``; offline, only
    what the cache holds): the source spec :func:`compose_checkpoints` takes."""
    path, mods = parse_source(spec)
    if not path.exists():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                     "*.txt", "*.jinja"]))
        except Exception as err:  # noqa: BLE001 - the hub's own error, reported with the id
            raise ValueError(f"{spec}: neither a folder nor a hub id whose snapshot could be had "
                             f"({type(err).__name__}: {err})") from None
    return f"{path}:{','.join(mods)}" if mods else str(path)


def source_table(base: str, sources: list[str]) -> pd.DataFrame:
    """One row per checkpoint: its family, class, the modalities asked of it and its language model's shape."""
    rows = []
    for role, spec in [("base", base), *(("source", s) for s in sources)]:
        path, mods = parse_source(spec)
        config = read_config(path)
        kind = config.get("model_type")
        rows.append({"role": role, "folder": path.name, "model_type": kind,
                     "class": FAMILIES[kind].cls if kind in FAMILIES else "causal LM",
                     "modalities": ", ".join(mods or ()) if role == "source" else "", **text_signature(config)})
    return pd.DataFrame(rows)


def weight_bytes(folder: str | Path, bytes_per_value: int = 2) -> dict[str, int]:
    """Bytes of a composed folder's weights at ``bytes_per_value`` (2: bf16): the LLM and each branch, counted
    from the safetensors headers (values, not file sizes)."""
    folder = Path(folder)
    parts = {"llm": folder / "llm", **{f"branch {p.name}": p for p in sorted((folder / "branches").iterdir())}}
    out = {}
    for name, path in parts.items():
        ckpt = Checkpoint(path)
        out[name] = sum(ckpt.info(n).numel for n in ckpt.names) * bytes_per_value
    out["total"] = sum(out.values())
    return out


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU, float32 on a CPU; else the named torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def real_mcub(folder: str | Path, mcub_dir: str | Path, split: str, n: int | None, device: str, dtype: str,
              size: int | None = None, batch_size: int = 8, max_new_tokens: int = 128,
              template: str = VICUNA_V1) -> dict:
    """The composed model of ``folder`` on the first ``n`` items of MCUB split ``split`` under ``mcub_dir``
    (``{split}.json`` + ``MCUB-answer.json``, media relative to it): :func:`evaluate_real`'s result."""
    mcub_dir = Path(mcub_dir)
    items = load_split(mcub_dir / f"{split}.json", mcub_dir / "MCUB-answer.json", mcub_dir)[:n]
    model = load_composed(folder, device_map=device, dtype=resolve_dtype(dtype, device), size=size)
    return evaluate_real(model, items, composed_preprocessors(folder, size), template, batch_size, max_new_tokens)


def compose(base: str, sources: list[str], method: str, out: str | Path, lam: float | None = None,
            **options) -> Path:
    """:func:`compose_checkpoints` of resolved sources, replacing an earlier output of the kit; ``lam`` is passed
    to methods that take one (MMER's: the masks' magnitude test, |tau_i| >= lam * 0.5 * |tau*|; DAMC's: each text
    LoRA's coefficient)."""
    from mckit.merge.registry import get

    if lam is not None and (method in ("mmer", "damc") or get(method).has_lam):
        options["lam"] = lam
    return compose_checkpoints(method, resolve(base), [resolve(s) for s in sources], out, overwrite=True,
                               **options)


def families_table() -> pd.DataFrame:
    """Every family the kit knows: its class, where its language model lives on disk, its position scheme."""
    return pd.DataFrame([{"model_type": f.model_type, "class": f.cls, "language model on disk": f.llm_prefixes[0],
                          "towers": ", ".join(f.towers), "positions": f.positions} for f in FAMILIES.values()])


