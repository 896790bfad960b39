"""A real source's tower and projector as a kit :class:`~mckit.models.mllm.Branch`: processed input -> LLM embeddings.

:func:`load_branch` builds the source's class with empty weights
(``accelerate.init_empty_weights``), reads only the tensors of the modality's
tower and projector from the shards that hold them, and calls them the way the
source does (its own ``get_image_features`` / ``get_video_features`` /
``get_audio_features``; Qwen2-Audio, whose class has none, through its tower then
its projector as its forward does), so one input gives exactly the embeddings the
source would splice into its prompt.
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

from mckit.models.adapters import Layout, MRoPEAdapter
from mckit.models.families import Family, FamilyError, family_of, read_config
from mckit.models.mllm import MLLM, Branch
from mckit.models.qwen_video import SECONDS_PER_GRID, VIDEO_FRAMES, qwen_video
from mckit.storage.tensorfiles import Checkpoint, TensorFileError

#: (model_type, modality) -> (method of the inner model, or of :data:`KIT_METHODS` where the class has none; its
#: keyword for the processed input).
FEATURES = {("llava", "image"): ("get_image_features", "pixel_values"),
            ("video_llava", "image"): ("get_image_features", "pixel_values_images"),
            ("video_llava", "video"): ("get_video_features", "pixel_values_videos"),
            ("llava_next_video", "video"): ("get_video_features", "pixel_values_videos"),
            ("llava_next_video", "image"): ("get_image_features", "pixel_values"),
            ("qwen2_vl", "image"): ("get_image_features", "pixel_values"),
            ("qwen2_vl", "video"): ("get_video_features", "pixel_values_videos"),
            ("qwen2_5_vl", "image"): ("get_image_features", "pixel_values"),
            ("qwen2_5_vl", "video"): ("get_video_features", "pixel_values_videos"),
            ("qwen2_5_omni_thinker", "image"): ("get_image_features", "pixel_values"),
            ("qwen2_5_omni_thinker", "audio"): ("get_audio_features", "input_features"),
            ("audioflamingo3", "audio"): ("get_audio_features", "input_features"),
            ("qwen2_audio", "audio"): ("audio_tower_projector", "input_features")}
#: Families whose audio method also takes a mask over the input's frames, by its keyword (every frame of a
#: fixed-length clip is real).
FRAME_MASKS = {"audioflamingo3": "input_features_mask", "qwen2_5_omni_thinker": "feature_attention_mask"}
#: Side of a square image in pixels where the family takes any size (Qwen-VL): 448 gives 256 positions.
DEFAULT_SIZE = 448
#: Families whose text resumes one past an input's largest M-RoPE index (the others: at its start + max(h, w)).
RESUME_AFTER_MAX = ("qwen2_5_omni_thinker", "qwen2_5_omni")


def audio_tower_projector(inner: nn.Module, input_features: torch.Tensor) -> torch.Tensor:
    """Qwen2-Audio's audio path (its class has no feature method): (B, bins, 2N) log-mel frames -> ``audio_tower``
    (two convolutions, the second of stride 2, then average pooling by 2) -> (B, N / 2, d_audio) ->
    ``multi_modal_projector`` -> (B, N / 2, d_llm). Every frame is real, so no mask (the model's own forward
    then masks nothing either)."""
    return inner.multi_modal_projector(inner.audio_tower(input_features).last_hidden_state)


#: Feature methods the kit supplies, called as ``method(inner, **{keyword: x})``.
KIT_METHODS = {"audio_tower_projector": audio_tower_projector}


class NativeFeatures(nn.Module):
    """The source's tower + projector, called as the source calls them: (B, ...) processed inputs ->
    (B, n_tokens, d_llm); per-frame outputs of a video are laid end to end (frames x tokens).

    ``grid``: Qwen-VL's patch grid (t, h, w) of one input, all inputs of one size: the input is then
    (B, t*h*w, patch_dim) flattened patches, passed with ``image_grid_thw`` / ``video_grid_thw``;
    ``positions``: the merged tokens' M-RoPE :class:`~mckit.models.adapters.Layout` (None without a grid).
    ``mask``: the method's keyword for a (B, frames) mask over the input's last axis, all ones. ``sizes``:
    LLaVA-NeXT's (H, W) of the image before tiling, passed as ``image_sizes``.
    """

    def __init__(self, inner: nn.Module, method: str, keyword: str, grid: tuple[int, int, int] | None = None,
                 positions=None, mask: str | None = None, sizes: tuple[int, int] | None = None):
        super().__init__()
        self.inner, self.method, self.keyword, self.grid = inner, method, keyword, grid
        self.positions, self.mask, self.sizes = positions, mask, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.inner.parameters()).dtype)          # processors give float32; the tower may be bf16
        kwargs = {self.keyword: x}
        if self.grid is not None:
            grid_keyword = "video_grid_thw" if self.keyword == "pixel_values_videos" else "image_grid_thw"
            kwargs = {self.keyword: x.reshape(-1, x.shape[-1]),
                      grid_keyword: torch.tensor([self.grid] * len(x), device=x.device)}
        if self.mask is not None:
            kwargs[self.mask] = torch.ones(x.shape[0], x.shape[-1], dtype=torch.long, device=x.device)
        if self.sizes is not None:
            kwargs["image_sizes"] = torch.tensor([self.sizes] * len(x), device=x.device)
        kit = KIT_METHODS.get(self.method)
        out = kit(self.inner, **kwargs) if kit else getattr(self.inner, self.method)(**kwargs)
        feats = getattr(out, "pooler_output", out)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(len(x), -1, feats.shape[-1])


def open_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint folder's tensor index; an unreadable one is a :class:`FamilyError` naming it."""
    try:
        return Checkpoint(path)
    except TensorFileError as err:
        raise FamilyError(str(err)) from None


def read_tensors(ckpt: Checkpoint, names) -> dict[str, torch.Tensor]:
    """{name: tensor} of ``names``, each shard that holds one opened once with ``safe_open`` (no other is read)."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(ckpt.file_of(name), []).append(name)
    out = {}
    for file, group in by_file.items():
        with safe_open(str(file), "pt") as f:
            out.update({n: f.get_tensor(n) for n in group})
    return out


def tower_tensors(path: Path, family: Family, modality: str) -> dict[str, torch.Tensor]:
    """{on-disk name: tensor} of ``modality``'s tower and projector, read only from the shards holding them."""
    ckpt = open_checkpoint(path)
    return read_tensors(ckpt, [n for n in ckpt.names if n.startswith(family.towers[modality])])


def _in_memory(names, memory: set[str], path: Path) -> dict[str, str]:
    """{on-disk name: in-memory name}: the name itself or under ``model.`` (transformers 5's layout)."""
    out = {}
    for name in names:
        found = next((m for m in (name, "model." + name) if m in memory), None)
        if found is None:
            raise FamilyError(f"{path}: tensor {name} has no place in the model's class")
        out[name] = found
    return out


def load_branch(path: str | Path, modality: str, dtype: torch.dtype | None = None, size: int | None = None) -> Branch:
    """``modality``'s branch of the checkpoint folder ``path``: its own tower and projector, empty-initialised
    and filled from disk (strict over the tower's tensors); ``n_tokens`` from one dry run. ``size``: the image
    side in pixels where the family takes any (Qwen-VL)."""
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
    for name, param in list(inner.named_parameters(recurse=False)):     # e.g. LLaVA-NeXT's image_newline
        if name not in mine and param.is_meta:
            delattr(inner, name)
    left = [n for n, p in inner.named_parameters() if p.is_meta]
    if left:
        raise FamilyError(f"{path}: the {modality} tower misses {left[0]} ({len(left)} tensors not on disk)")
    shape, grid, merge = input_layout(cfg, modality, size)
    positions = None if grid is None else mrope_layout(cfg, family, modality, grid, merge)
    side = anyres_side(cfg) if modality == "image" and hasattr(cfg, "image_grid_pinpoints") else None
    encoder = NativeFeatures(inner, *FEATURES[family.model_type, modality], grid=grid, positions=positions,
                             mask=FRAME_MASKS.get(family.model_type) if modality == "audio" else None,
                             sizes=None if side is None else (side, side)).eval()
    if dtype is not None:
        encoder.to(dtype)
    with torch.no_grad():
        probe = encoder(torch.zeros((1, *shape), dtype=dtype or torch.float32))
    return Branch(modality, encoder, nn.Identity(), n_tokens=probe.shape[1], projector_type=family.model_type,
                  input_shape=shape)


def input_layout(config, modality: str, size: int | None = None) -> tuple[tuple[int, ...], tuple | None, int]:
    """One processed input's shape, Qwen-VL's patch grid (None elsewhere) and its spatial merge.

    Audio: (mel bins, 2 x the encoder's positions) log-mel frames. CLIP towers: (3, S, S) pixels for an image,
    (frames, 3, S, S) for a video, S the tower's. Qwen-VL: an
    image of ``size`` x ``size`` pixels (default :data:`DEFAULT_SIZE`) as the processor flattens it,
    (h * w, 3 * T * P * P) with h = w = size / P, T the temporal patch (the image repeated T times), grid
    (1, h, w); a video of :data:`~mckit.models.qwen_video.VIDEO_FRAMES` F such frames,
    (F / T * h * w, 3 * T * P * P) with grid (F / T, h, w). LLaVA-NeXT's anyres image: a square of
    :func:`anyres_side` pixels as its processor tiles it, (1 + (side / S)^2, 3, S, S): the whole image at S x S,
    then the tiles row by row.
    """
    if modality == "audio":                                  # Whisper-style log-mel frames of a fixed-length clip
        audio = config.audio_config
        return (audio.num_mel_bins, 2 * audio.max_source_positions), None, 1
    vision = config.vision_config
    if hasattr(vision, "spatial_merge_size"):
        side, patch = size or DEFAULT_SIZE, vision.patch_size
        unit = patch * vision.spatial_merge_size
        if side % unit:
            raise FamilyError(f"image size {side} is not a multiple of {unit} (patch {patch} x merge "
                              f"{vision.spatial_merge_size})")
        grid = (VIDEO_FRAMES // vision.temporal_patch_size if modality == "video" else 1, side // patch, side // patch)
        dim = getattr(vision, "in_channels", 3) * vision.temporal_patch_size * patch * patch
        return (grid[0] * grid[1] * grid[2], dim), grid, vision.spatial_merge_size
    pixels = (3, vision.image_size, vision.image_size)
    if modality == "image" and hasattr(config, "image_grid_pinpoints"):
        return (1 + (anyres_side(config) // vision.image_size) ** 2, *pixels), None, 1
    return ((getattr(config, "num_frames", 8), *pixels) if modality == "video" else pixels), None, 1


def anyres_side(config) -> int:
    """The side of the largest square among LLaVA-NeXT's ``image_grid_pinpoints`` (672 for the 7B models): the
    one resolution the kit gives its images, so every image takes the same tokens (base tokens, then the tiles'
    tokens with an ``image_newline`` closing each row; a square is never unpadded)."""
    squares = [h for h, w in config.image_grid_pinpoints if h == w]
    if not squares:
        raise FamilyError(f"image_grid_pinpoints {config.image_grid_pinpoints}: no square resolution to tile an "
                          "image at")
    return max(squares)


def mrope_layout(config, family: Family, modality: str, grid: tuple[int, int, int], merge: int) -> Layout:
    """The M-RoPE layout of one input of patch grid ``grid``: its merged tokens' grid (t, h / merge, w / merge);
    a video's temporal stride is Qwen2.5-VL's ``tokens_per_second`` x :data:`SECONDS_PER_GRID` (what its
    rope index takes when no ``second_per_grid_ts`` is given), 1 elsewhere (Qwen2-VL)."""
    per_second = getattr(config.vision_config, "tokens_per_second", None) if modality == "video" else None
    return Layout((grid[0], grid[1] // merge, grid[2] // merge), per_second * SECONDS_PER_GRID if per_second else 1.0,
                  "max" if family.model_type in RESUME_AFTER_MAX else "side")


def real_mllm(llm: nn.Module, tokenizer, branches: dict[str, Branch]) -> MLLM:
    """An :class:`MLLM` of a real language model and real branches; with Qwen's 3-D rotary positions, each
    input's merged-token grid lays out its positions as the source lays them out."""
    model = MLLM(llm, tokenizer, branches)
    if isinstance(model.adapter, MRoPEAdapter):
        model.adapter = MRoPEAdapter({m: b.encoder.positions for m, b in branches.items()
                                      if getattr(b.encoder, "positions", None)})
    return model


def preprocessor(path: str | Path, modality: str, size: int | None = None):
    """The source's own processor for one decoded input of ``modality`` (a PIL image; video frames (F, H, W, 3)
    uint8; 16 kHz mono samples), read from ``preprocessor_config.json`` in ``path``: returns the tensor its branch
    takes (its ``input_shape``). A Whisper extractor pads or cuts a clip to the branch's 2 x max_source_positions
    frames; Qwen-VL resizes an image (each of a video's :data:`VIDEO_FRAMES` evenly sampled frames) to ``size``
    x ``size`` and flattens its patches (a video's as :mod:`mckit.models.qwen_video` lays them out)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    path = Path(path)
    family = family_of(read_config(path), path)
    if not (path / "preprocessor_config.json").is_file():
        raise FamilyError(f"{path}: no preprocessor_config.json (the source's processor)")
    if (family.model_type, modality) not in FEATURES:
        raise FamilyError(f"{path}: {modality} inputs of {family.model_type} are not supported")
    if modality == "audio":
        extractor = AutoFeatureExtractor.from_pretrained(path)
        frames = input_layout(transformers.AutoConfig.from_pretrained(path), "audio")[0][1]
        return lambda samples: extractor(samples, sampling_rate=extractor.sampling_rate, return_tensors="pt",
                                         max_length=frames * extractor.hop_length)["input_features"][0]
    processor = AutoImageProcessor.from_pretrained(path)
    if family.positions == "mrope":
        side = size or DEFAULT_SIZE
        if modality == "video":
            return qwen_video(processor, side)

        def qwen(image) -> torch.Tensor:
            square = image.resize((side, side))
            return processor(images=square, size={"shortest_edge": side * side, "longest_edge": side * side},
                             return_tensors="pt")["pixel_values"]
        return qwen
    if modality == "video":
        return lambda frames: processor(images=list(frames), return_tensors="pt")["pixel_values"]
    if hasattr(config := transformers.AutoConfig.from_pretrained(path), "image_grid_pinpoints"):
        side = anyres_side(config)
        return lambda image: processor(images=image.resize((side, side)), return_tensors="pt")["pixel_values"][0]
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]
