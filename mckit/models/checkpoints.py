"""Save and load MLLMs with safetensors + JSON, in Hugging Face conventions.

A checkpoint directory holds::

    mllm.json              {"format": "mckit-mllm", "modalities": {...}, "llm": {"kind", "path"}}
    branches.safetensors   every branch's encoder + projector ("image.encoder.net.0.weight", ...)
    tokenizer/             the word-level tokenizer (tokenizer.json)
    llm/                   kind "full": a plain transformers checkpoint (config.json + model.safetensors)
    adapter/               kind "lora": a peft adapter over the base LLM at ``path``
    adapters/{route}/      kind "decoupled": one peft LoRA adapter per route, ``text`` and each modality
                           (DAMC, :mod:`mckit.models.decoupled`)

Kind "base" (frozen LLM, e.g. after stage 1) only points at the base LLM.
Paths are relative to the checkpoint, so a copied ``data/world`` keeps working.
Writes are atomic: everything goes to a temporary sibling directory that is
renamed into place at the end.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from mckit.models.decoupled import TEXT, framed, is_decoupled, save_adapter, span_of
from mckit.models.lora import PEFT_PREFIX, is_lora, quiet_peft
from mckit.models.mllm import MLLM, Branch, toy_branch
from mckit.models.routing import LINEARS, LowRankDelta, route_linears
from mckit.storage.atomic import atomic_dir

FORMAT = "mckit-mllm"
#: Kinds of the ``llm`` entry of ``mllm.json`` and the paths each needs.
LLM_KINDS = {"full": ("path",), "lora": ("path", "base"), "base": ("base",), "decoupled": ("path", "base")}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def branch_state(model: MLLM) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.detach().contiguous() for m, b in model.branches.items() for k, v in b.state_dict().items()}


def check_safetensors(path: Path) -> None:
    """Open only the header of a safetensors file: a missing or corrupt file becomes a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"missing safetensors file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"corrupt safetensors file {path}: {err}") from err


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing or corrupt file into a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"missing safetensors file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"corrupt safetensors file {path}: {err}") from err


def load_branch_state(branches: dict[str, Branch], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy tensors into branches, naming any missing, unexpected or mis-shaped tensor."""
    for mod, branch in branches.items():
        own = branch.state_dict()
        for key, ref in own.items():
            name = f"{mod}.{key}"
            if name not in tensors:
                raise CheckpointError(f"{source}: tensor {name!r} is missing")
            if tensors[name].shape != ref.shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, model expects {tuple(ref.shape)}"
                )
        branch.load_state_dict({k: tensors[f"{mod}.{k}"] for k in own})


def save_mllm(model: MLLM, out: str | Path, base_path: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save ``model`` to ``out``. ``base_path`` (the base LLM dir) is needed for kinds lora and base."""
    out = Path(out)
    llm = model.llm
    kind = "lora" if is_lora(llm) else "decoupled" if is_decoupled(llm) else "base" if base_path is not None else "full"
    if kind in ("lora", "decoupled") and base_path is None:
        raise ValueError(f"saving a {kind} model needs base_path, the directory of its base LLM")
    with atomic_dir(out, overwrite) as tmp:
        save_file(branch_state(model), str(tmp / "branches.safetensors"))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        llm_entry: dict = {"kind": kind}
        if kind == "full":
            llm.save_pretrained(str(tmp / "llm"))
            llm_entry["path"] = "llm"
        else:
            llm_entry["base"] = os.path.relpath(Path(base_path).resolve(), out.resolve())
            if kind == "lora":
                llm.save_pretrained(str(tmp / "adapter"))
                llm_entry["path"] = "adapter"
            if kind == "decoupled":
                _save_decoupled(model, tmp / "adapters")
                llm_entry["path"] = "adapters"
        meta = {
            "format": FORMAT,
            "modalities": {m: {"projector": b.projector_type, "n_tokens": b.n_tokens,
                               **({"span": span_of(b)} if span_of(b) else {})} for m, b in model.branches.items()},
            "llm": llm_entry,
        }
        (tmp / "mllm.json").write_text(json.dumps(meta, indent=2))
    return out


def _save_decoupled(model: MLLM, folder: Path) -> None:
    """A decoupled model's LoRAs, one peft adapter per route: ``folder/text``, ``folder/{modality}``."""
    from mckit.models.decoupled import route_factors

    names = {0: TEXT, **{route: mod for mod, route in model.route_ids.items()}}
    for route, factors in route_factors(model.llm).items():
        save_adapter(factors, folder / names[route])


def read_meta(path: Path) -> dict:
    meta_file = path / "mllm.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not an mckit MLLM checkpoint (no mllm.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{meta_file}: format {found!r}, expected {FORMAT!r}")
    _check_llm_entry(meta.get("llm"), meta_file)
    _check_modalities(meta.get("modalities"), meta_file)
    return meta


def _check_llm_entry(entry, meta_file: Path) -> None:
    """The ``llm`` entry of ``mllm.json``: ``{"kind", "path" and/or "base"}`` (see :data:`LLM_KINDS`)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{meta_file}: no 'llm' entry (an object with 'kind' and 'path' or 'base'), "
                              f"got {entry!r}")
    kind = entry.get("kind")
    if kind not in LLM_KINDS:
        raise CheckpointError(f"{meta_file}: 'llm' kind {kind!r}, expected one of {sorted(LLM_KINDS)}")
    for key in LLM_KINDS[kind]:
        if not isinstance(entry.get(key), str):
            raise CheckpointError(f"{meta_file}: 'llm' entry of kind {kind!r} needs a {key!r} path")


def _check_modalities(modalities, meta_file: Path) -> None:
    """The ``modalities`` entry of ``mllm.json``: ``{modality: {"projector": type, "n_tokens": n}}``."""
    if not isinstance(modalities, dict):
        raise CheckpointError(f"{meta_file}: no 'modalities' entry (an object {{modality: {{'projector': type}}}}), "
                              f"got {modalities!r}")
    for mod, spec in modalities.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("projector"), str):
            raise CheckpointError(f"{meta_file}: modality {mod!r} needs a 'projector' type, got {spec!r}")


@contextmanager
def quiet_loading():
    """Silence transformers' per-load "Loading weights" bar (tiny models load in milliseconds)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def llm_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a transformers checkpoint: ``model.safetensors``, or every shard its index names."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return [path / "model.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map): {err}") from err
    return [path / name for name in sorted(set(weight_map.values()))]


def load_llm(path: str | Path):
    """A plain transformers causal LM from ``path`` (single file or sharded with an index), with clear errors
    for missing or corrupt weights."""
    path = Path(path)
    for file in llm_weight_files(path):
        check_safetensors(file)
    with quiet_loading():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def load_tokenizer_dir(folder: Path) -> PreTrainedTokenizerFast:
    """A checkpoint's ``tokenizer/`` folder, or :class:`CheckpointError` naming it."""
    if not (folder / "tokenizer.json").is_file():
        what = "no tokenizer.json in the tokenizer folder" if folder.is_dir() else "missing tokenizer folder"
        raise CheckpointError(f"{what} {folder}")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as err:  # tokenizers raises a bare Exception for a corrupt file
        raise CheckpointError(f"corrupt tokenizer {folder / 'tokenizer.json'}: {err}") from err


def _load_checkpoint_llm(path: Path, entry: dict):
    """The LLM an ``llm`` entry describes: the checkpoint's own, its base, or its base with a LoRA adapter (a
    decoupled model's adapters are attached once its branches give the routes, in :func:`load_mllm`)."""
    if entry["kind"] == "full":
        return load_llm(path / entry["path"])
    llm = load_llm((path / entry["base"]).resolve())
    if entry["kind"] == "lora":
        check_safetensors(path / entry["path"] / "adapter_model.safetensors")
        with quiet_peft():
            llm = PeftModel.from_pretrained(llm, str(path / entry["path"])).eval()
    return llm


def load_mllm(path: str | Path, modalities: list[str] | None = None) -> MLLM:
    """Load an MLLM checkpoint (optionally only some of its branches).

    ``mllm.json``, the branch choice and the tokenizer are checked before the LLM loads;
    a bad checkpoint raises :class:`CheckpointError` naming the file or folder.
    """
    path = Path(path)
    meta = read_meta(path)
    wanted = modalities or list(meta["modalities"])
    missing = [m for m in wanted if m not in meta["modalities"]]
    if missing:
        raise CheckpointError(f"{path}: no branch for modality {missing}; it has {list(meta['modalities'])}")
    tokenizer = load_tokenizer_dir(path / "tokenizer")
    llm = _load_checkpoint_llm(path, meta["llm"])
    hidden = llm.get_input_embeddings().weight.shape[1]
    try:
        branches = {m: toy_branch(m, hidden, meta["modalities"][m]["projector"]) for m in wanted}
        branches = {m: framed(b, hidden, meta["modalities"][m]["span"]) if meta["modalities"][m].get("span") else b
                    for m, b in branches.items()}
    except ValueError as err:
        raise CheckpointError(f"{path / 'mllm.json'}: {err}") from None
    load_branch_state(branches, load_tensors(path / "branches.safetensors"), path / "branches.safetensors")
    model = MLLM(llm, tokenizer, branches).eval()
    if meta["llm"]["kind"] == "decoupled":
        _attach_decoupled(model, path / meta["llm"]["path"])
    model.requires_grad_(False)
    return model


def _attach_decoupled(model: MLLM, folder: Path) -> None:
    """Route the model's LLM through the adapters under ``folder``: ``text`` and one per modality of the model."""
    routes = {TEXT: 0, **model.route_ids}
    present = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    missing = [name for name in routes if name not in present]
    if missing:
        raise CheckpointError(f"{folder}: no LoRA adapter for route {missing[0]!r}; the decoupled model has "
                              f"{present}")
    attach_adapters(model.llm, {route: read_adapter(folder / name) for name, route in routes.items()},
                    model.route_state)


def read_adapter(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """A peft LoRA adapter folder -> ({weight name: (A, B)}, scale = alpha / r)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"missing LoRA adapter config {config_file}")
    config = json.loads(config_file.read_text())
    tensors = load_tensors(folder / "adapter_model.safetensors")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            if f"{stem}.lora_B.weight" not in tensors:
                raise CheckpointError(f"{folder}: tensor {stem}.lora_B.weight is missing")
            pairs[stem.removeprefix(PEFT_PREFIX) + ".weight"] = (tensors[key], tensors[f"{stem}.lora_B.weight"])
    if not pairs:
        raise CheckpointError(f"{folder}: no LoRA tensors in adapter_model.safetensors")
    return pairs, config["lora_alpha"] / config["r"]


def attach_adapters(llm: nn.Module, adapters: dict[int, tuple[dict, float]], state) -> None:
    """Route ``llm``'s linears through frozen low-rank deltas read by :func:`read_adapter`: route id ->
    (pairs, scale)."""
    modules = dict(llm.named_modules())
    deltas: dict[int, dict[str, nn.Module]] = {}
    for route, (pairs, scale) in adapters.items():
        for weight, (A, B) in pairs.items():
            name = weight.removesuffix(".weight")
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear) or name.rsplit(".", 1)[-1] not in LINEARS:
                raise CheckpointError(f"LoRA tensor for {weight!r} (route {route}): no such linear in the LLM")
            if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features or A.shape[0] != B.shape[1]:
                raise CheckpointError(f"LoRA tensors for {weight!r} (route {route}): A {tuple(A.shape)}, "
                                      f"B {tuple(B.shape)} do not fit the linear {tuple(linear.weight.shape)}")
            deltas.setdefault(route, {})[name] = LowRankDelta(A, B, scale)
    route_linears(llm, deltas, state)
