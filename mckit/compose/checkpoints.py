"""Compose real checkpoints into one folder: a merged language model, each source's branch, a manifest.

    python -m mckit compose --method ties --base BASE --sources SRC[:MODALITY,...] ... --out OUT [--keep 0.2 ...]

``OUT`` holds:

- ``llm/``: the merged language model under causal-LM names (``model.*``, ``lm_head.weight``), written by the
  streaming engine over renamed, zero-copy views of the sources' own shards (one tensor per input in memory,
  never a whole model); its ``config.json`` is the text config, so ``AutoModelForCausalLM`` opens it; the base's
  tokenizer files;
- ``branches/{modality}/``: that modality's tower and projector tensors under the source's own names, with the
  source's config and preprocessor files: a partial checkpoint that
  :func:`mckit.models.real_branches.load_branch` reads;
- with ``--method mmer``: ``llm/`` holds the text route's weights and ``mmer.safetensors`` tau* and each
  modality's bit-packed mask (:mod:`mckit.compose.mmer_files`); :func:`load_composed` routes each modality's
  positions through its mask;
- with ``--method damc`` (decoupled sources: ``SOURCE/adapters/text/`` and ``SOURCE/adapters/MODALITY/``, peft
  LoRAs over the base's own language model): ``llm/`` holds W0 + sum_i lambda_i dW_i_text and
  ``damc.safetensors`` the LoRAs' factors (:mod:`mckit.compose.damc_files`); :func:`load_composed` routes each
  modality's positions through W0 + its own LoRA;
- ``manifest.json``: the method and its options, the base, every source and the modalities it gives, the text
  config and the position scheme.

Every check (families, one language model for all, modalities, the output path) runs before anything is
written; the folder appears whole or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mckit.compose.damc_files import (
    ADAPTERS,
    DAMC_FILE,
    check_frozen_w0,
    damc_options,
    read_adapter,
    route_damc,
    write_damc,
)
from mckit.compose.mmer_files import MASK_FILE, mmer_options, route_mmer, write_mmer
from mckit.merge.checks import MergeError, check_distinct, check_fine_tunes, merged_names, prepare_out
from mckit.merge.engine import DEFAULT_INCLUDE, merge_views
from mckit.models.decoupled import TEXT
from mckit.models.families import (
    ARCHITECTURES,
    FAMILIES,
    FamilyError,
    check_same_text_base,
    family_of,
    llm_names,
    read_config,
    text_config,
)
from mckit.models.mllm import MLLM
from mckit.models.real_branches import FEATURES, load_branch, open_checkpoint, preprocessor, real_mllm, tower_tensors
from mckit.storage.atomic import atomic_dir
from mckit.storage.tensorfiles import RenamedView

#: Files copied beside a branch's tensors (the source's processors) and beside the merged LLM (the base's).
BRANCH_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
MANIFEST = "manifest.json"
#: The modality a source is given as (``SOURCE:text``) when only its language model is wanted.
TEXT_ONLY = "text"


def parse_source(spec: str) -> tuple[Path, tuple[str, ...] | None]:
    """``DIR`` or ``DIR:image,video`` -> (folder, modalities or None for every one it can give)."""
    path, _, mods = spec.rpartition(":") if ":" in Path(spec).name else (spec, "", "")
    return Path(path), tuple(m for m in mods.split(",") if m) or None


def llm_view(path: Path) -> RenamedView:
    """A zero-copy view of the language model of checkpoint folder ``path`` under causal-LM names (a plain
    language model is its own view), with its text config."""
    config = read_config(path)
    ckpt = open_checkpoint(path)
    if config.get("model_type") in FAMILIES:
        names = llm_names(family_of(config, path), ckpt.names)
    elif config.get("model_type") in ARCHITECTURES:
        names = {n: n for n in ckpt.names}
    else:
        raise FamilyError(f"{path}: model_type {config.get('model_type')!r} is neither a language model the kit "
                          f"knows ({', '.join(sorted(ARCHITECTURES))}) nor a family ({', '.join(sorted(FAMILIES))})")
    return RenamedView(ckpt, names, text_config(config))


def plan_branches(sources: list[tuple[Path, tuple[str, ...] | None]]) -> dict[str, Path]:
    """{modality: source folder}: each source's modalities (all it can give when none are named; ``text``: none,
    its language model is merged and nothing else is used); a modality given by two sources, or one a source
    cannot give, is an error naming them."""
    out: dict[str, Path] = {}
    for path, mods in sources:
        family = family_of(read_config(path), path)
        possible = tuple(m for t, m in FEATURES if t == family.model_type)
        for mod in (m for m in mods or possible if m != TEXT_ONLY):
            if mod not in possible:
                raise FamilyError(f"{path}: a {family.model_type} model gives no {mod} branch the kit can run "
                                  f"(it gives {', '.join(possible) or 'none'})")
            if mod in out:
                raise FamilyError(f"{mod} is given by both {out[mod]} and {path}; name one with SOURCE:{mod}")
            out[mod] = path
    return out


def plan_routed(method: str, options: dict, paths: list[Path], given: dict, views: list) -> dict | None:
    """The checked options of the routed methods (mmer, damc: one modality per source), with each DAMC source's
    text and modality adapters read and its language model checked to be the base's; None for the others."""
    if method not in ("mmer", "damc"):
        return None
    several = next((p for p, mods in given.items() if len(mods) != 1), None)
    if several is not None:
        raise MergeError(f"{method} takes one modality per source: {several} gives "
                         f"{', '.join(given[several]) or 'none'}; name one with SOURCE:MODALITY")
    if method == "mmer":
        return mmer_options(options, len(paths))
    merged = merged_names(views[0].names, DEFAULT_INCLUDE)
    texts, modal = [], {}
    for path, view in zip(paths, views[1:]):
        family = family_of(read_config(path), path)
        for name in dict.fromkeys((merged[0], merged[-1])):
            check_frozen_w0(views[0], view, name, str(path))
        texts.append(read_adapter(path / ADAPTERS / TEXT, family))
        modal[given[path][0]] = read_adapter(path / ADAPTERS / given[path][0], family)
    return {"options": damc_options(options, len(paths)), "adapters": (texts, modal)}


def compose_checkpoints(method: str, base: str | Path, sources: list[str], out: str | Path, *,
                        overwrite: bool = False, progress: bool = True, **options) -> Path:
    """Merge the sources' language models over ``base`` with ``method`` (any registered merging method and its
    options, ``"mmer"``: :mod:`mckit.compose.mmer_files`, or ``"damc"``: :mod:`mckit.compose.damc_files`) and copy
    each source's branches; see the module doc for the layout. Returns ``out``."""
    out, base = Path(out), Path(base)
    parsed = [parse_source(s) for s in sources]
    if not parsed:
        raise MergeError("no source checkpoints given")
    paths = [p for p, _ in parsed]
    prepare_out(out, overwrite, [base, *paths])
    check_distinct(base, paths)
    check_same_text_base({str(p): read_config(p) for p in (base, *paths)})
    branches = plan_branches(parsed)
    views = [llm_view(p) for p in (base, *paths)]
    if method != "damc":
        check_fine_tunes(views[0], views[1:], merged_names(views[0].names, DEFAULT_INCLUDE), [str(p) for p in paths])
    mrope = [v.config() for p, v in zip(paths, views[1:]) if family_of(read_config(p), p).positions == "mrope"]
    text = mrope[0] if mrope else views[0].config()       # a plain Qwen2 base: its sources' 3-D rotary config
    given = {p: [m for m, q in branches.items() if q == p] for p in paths}
    routed = plan_routed(method, options, paths, given, views)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = {"method": method, "options": options, "base": str(base),
                    "sources": [{"path": str(p), "model_type": read_config(p)["model_type"], "modalities": given[p]}
                                for p in paths],
                    "text_config": text, "positions": "mrope" if mrope else "1d",
                    "branches": {m: f"branches/{m}" for m in branches}}
        if method == "mmer":
            modalities = tuple(given[p][0] for p in paths)
            info = write_mmer(views[0], views[1:], modalities, tmp / "llm", tmp / MASK_FILE, routed, progress)
            manifest["mmer"] = {"file": MASK_FILE, "modalities": list(modalities), **info}
        elif method == "damc":
            manifest["damc"] = write_damc(views[0], *routed["adapters"], tmp / "llm", tmp / DAMC_FILE,
                                          routed["options"], progress)
        else:
            merge_views(method, views[0], views[1:], tmp / "llm", side_files=False, progress=progress, **options)
        write_llm_files(base, text, tmp / "llm", bool(mrope))
        for mod, path in branches.items():
            write_branch(path, mod, tmp / "branches" / mod)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def write_llm_files(base: Path, text: dict, folder: Path, mrope: bool) -> None:
    """``config.json`` of the merged LLM (Qwen's 3-D rotary text models as plain Qwen2, which they equal on text)
    and the base's tokenizer files."""
    config = {**text, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]} if mrope else dict(text)
    config.setdefault("architectures", [f"{text['model_type'].capitalize()}ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)


def write_branch(source: Path, modality: str, folder: Path) -> None:
    """``modality``'s tower and projector tensors of ``source`` (its own names) and its config files."""
    family = family_of(read_config(source), source)
    folder.mkdir(parents=True)
    tensors = {n: t.contiguous() for n, t in tower_tensors(source, family, modality).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in BRANCH_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def load_composed(folder: str | Path, device_map=None, dtype: torch.dtype | None = None, tokenizer=None,
                  size: int | None = None) -> MLLM:
    """The composed model of :func:`compose_checkpoints`' folder: its merged LLM (``device_map`` and ``dtype`` as
    ``from_pretrained`` takes them), every branch on the LLM's device, the base's tokenizer (or ``tokenizer``);
    ``size``: the image side in pixels for families that take any (Qwen-VL)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mckit.models.real_llm import causal_lm

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FamilyError(f"{folder}: no {MANIFEST} (not a folder written by `python -m mckit compose`)")
    manifest = json.loads((folder / MANIFEST).read_text())
    llm_dir = folder / "llm"
    if manifest["positions"] == "mrope":
        llm = _load_mrope(llm_dir, manifest["text_config"], causal_lm, dtype)
        if device_map is not None:
            llm.to("cuda" if device_map == "auto" and torch.cuda.is_available() else
                   "cpu" if device_map == "auto" else device_map)
    else:
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype, device_map=device_map).eval()
    if tokenizer is None and (llm_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    device = next(llm.parameters()).device
    branches = {m: load_branch(folder / sub, m, dtype, size).to(device) for m, sub in manifest["branches"].items()}
    model = real_mllm(llm, tokenizer, branches)
    if "mmer" in manifest:
        route_mmer(model, folder / manifest["mmer"]["file"], manifest["mmer"]["modalities"])
    if "damc" in manifest:
        route_damc(model, folder / manifest["damc"]["file"], manifest["damc"]["modalities"])
    return model


def composed_preprocessors(folder: str | Path, size: int | None = None) -> dict:
    """{modality: the source's processor for one decoded input} of a composed folder's branches."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    return {m: preprocessor(Path(folder) / sub, m, size) for m, sub in manifest["branches"].items()}


def _load_mrope(llm_dir: Path, text: dict, causal_lm, dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    with init_empty_weights():
        llm = causal_lm(text, mrope=True)
    state = {}
    for file in sorted(llm_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    llm.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return llm.eval()
