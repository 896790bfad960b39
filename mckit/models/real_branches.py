"""A real source's tower and projector as a kit :class:`~mckit.models.mllm.Branch`: processed input -> LLM embeddings.

:func:`load_branch` builds the source's class with empty weights
(``accelerate.init_empty_weights``), reads only the tensors of the modality's
tower and projector from the shards that hold them, and calls them the way the
source does (its own ``get_image_features`` / ``get_video_features``), so one
input gives exactly the embeddings the source would splice into its prompt.
The language model and the other towers are never read: they stay on the meta
device and are dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from mckit.models.families import Family, FamilyError, family_of, read_config
from mckit.models.mllm import Branch
from mckit.storage.tensorfiles import Checkpoint, TensorFileError

#: (model_type, modality) -> (method of the inner model, its keyword for the processed input).
FEATURES = {("llava", "image"): ("get_image_features", "pixel_values"),
            ("video_llava", "image"): ("get_image_features", "pixel_values_images"),
            ("video_llava", "video"): ("get_video_features", "pixel_values_videos")}


class NativeFeatures(nn.Module):
    """The source's tower + projector, called as the source calls them: (B, ...) processed inputs ->
    (B, n_tokens, d_llm); per-frame outputs of a video are laid end to end (frames x tokens)."""

    def __init__(self, inner: nn.Module, method: str, keyword: str):
        super().__init__()
        self.inner, self.method, self.keyword = inner, method, keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.inner, self.method)(**{self.keyword: x})
        feats = getattr(out, "pooler_output", out)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(len(x), -1, feats.shape[-1])


def tower_tensors(path: Path, family: Family, modality: str) -> dict[str, torch.Tensor]:
    """{on-disk name: tensor} of ``modality``'s tower and projector, read only from the shards holding them."""
    try:
        ckpt = Checkpoint(path)
    except TensorFileError as err:
        raise FamilyError(str(err)) from None
    prefixes = family.towers[modality]
    wanted = [n for n in ckpt.names if n.startswith(prefixes)]
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(ckpt.file_of(name), []).append(name)
    out = {}
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            out.update({n: f.get_tensor(n) for n in names})
    return out


def _in_memory(names, memory: set[str], path: Path) -> dict[str, str]:
    """{on-disk name: in-memory name}: the name itself or under ``model.`` (transformers 5's layout)."""
    out = {}
    for name in names:
        found = next((m for m in (name, "model." + name) if m in memory), None)
        if found is None:
            raise FamilyError(f"{path}: tensor {name} has no place in the model's class")
        out[name] = found
    return out


def load_branch(path: str | Path, modality: str, dtype: torch.dtype | None = None) -> Branch:
    """``modality``'s branch of the checkpoint folder ``path``: its own tower and projector, empty-initialised
    and filled from disk (strict over the tower's tensors); ``n_tokens`` and ``input_shape`` from one dry run."""
    path = Path(path)
    config = read_config(path)
    family = family_of(config, path)
    if (family.model_type, modality) not in FEATURES:
        wired = ", ".join(f"{t}/{m}" for t, m in FEATURES)
        raise FamilyError(f"{path}: {modality} inputs of {family.model_type} are not supported (supported: {wired})")
    cfg = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights():
        shell = getattr(transformers, family.cls)(cfg)
    tensors = tower_tensors(path, family, modality)
    names = _in_memory(tensors, set(shell.state_dict()), path)
    shell.load_state_dict({names[n]: t for n, t in tensors.items()}, strict=False, assign=True)
    inner = shell.model
    mine = tuple(p.rstrip(".") for p in family.towers[modality])
    for child, module in list(inner.named_children()):     # the LLM and other towers: meta only, dropped
        if child not in mine and any(p.is_meta for p in module.parameters()):
            setattr(inner, child, nn.Module())
    left = [n for n, p in inner.named_parameters() if p.is_meta]
    if left:
        raise FamilyError(f"{path}: the {modality} tower misses {left[0]} ({len(left)} tensors not on disk)")
    encoder = NativeFeatures(inner, *FEATURES[family.model_type, modality]).eval()
    if dtype is not None:
        encoder.to(dtype)
    shape = input_shape(cfg, modality)
    with torch.no_grad():
        probe = encoder(torch.zeros((1, *shape), dtype=dtype or torch.float32))
    return Branch(modality, encoder, nn.Identity(), n_tokens=probe.shape[1], projector_type=family.model_type,
                  input_shape=shape)


def input_shape(config, modality: str) -> tuple[int, ...]:
    """One processed input's shape: (3, S, S) pixels for an image, (frames, 3, S, S) for a video."""
    vision = config.vision_config
    pixels = (3, vision.image_size, vision.image_size)
    return (getattr(config, "num_frames", 8), *pixels) if modality == "video" else pixels
