"""Qwen-VL video inputs without a video processor: frames the kit samples, patched as Qwen2-VL's video processor
patches them.

Qwen2-VL's video processor needs torchvision; its image processor does not, and on a list of frames it gives each
frame's own patches (a still image: the frame repeated T = ``temporal_patch_size`` times, grid (1, h, w)), not a
video's. A video's flattened patches put T consecutive frames side by side: with merge m and patch P, row
(ti, bh, bw, mh, mw) of the (F/T * h * w, C * T * P * P) patches holds, in the order (c, k, y, x),

    frame[ti * T + k][c, (bh * m + mh) * P + y, (bw * m + mw) * P + x]

and ``video_grid_thw`` is (F / T, h, w). :func:`video_patches` regroups the image processor's per-frame patches
(resized, rescaled and normalised exactly as for an image) into that layout.
"""

from __future__ import annotations

import numpy as np
import torch

from mckit.models.families import FamilyError

#: Frames the kit samples from one video (MCUB's 8), a multiple of Qwen-VL's temporal patch (2).
VIDEO_FRAMES = 8
#: Seconds one temporal patch spans (Qwen2.5-VL's ``second_per_grid_ts``): its processor's default 2 frames a
#: second over a temporal patch of 2, and the model's own value when none is given.
SECONDS_PER_GRID = 1.0


def sample_frames(frames, count: int) -> np.ndarray:
    """``count`` of the (F, H, W, 3) uint8 frames at evenly spaced indices (rounded ``linspace`` over 0 .. F - 1;
    a short clip repeats frames)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise FamilyError(f"video frames: expected (F, H, W, 3) RGB frames, got shape {frames.shape}")
    index = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return frames[index]


def video_patches(frame_patches: torch.Tensor, frames: int, temporal: int, channels: int, patch: int) -> torch.Tensor:
    """The image processor's (frames * n, C * T * P * P) patches of ``frames`` frames (each frame repeated T times)
    -> a video's (frames / T * n, C * T * P * P) patches: frames grouped T by T, each patch's T slots holding the
    group's frames in order (see the module doc)."""
    if frames % temporal:
        raise FamilyError(f"video of {frames} frames: not a multiple of the temporal patch {temporal}")
    per_frame = frame_patches.reshape(frames, -1, channels, temporal, patch, patch)[:, :, :, 0]    # (F, n, C, P, P)
    n = per_frame.shape[1]
    grouped = per_frame.reshape(frames // temporal, temporal, n, channels, patch, patch).permute(0, 2, 3, 1, 4, 5)
    return grouped.reshape(frames // temporal * n, channels * temporal * patch * patch)


def qwen_video(processor, side: int, frames: int = VIDEO_FRAMES):
    """A callable: (F, H, W, 3) uint8 frames -> the (frames / T * (side / P)^2, C * T * P * P) patches of
    ``frames`` evenly sampled frames, each resized to ``side`` x ``side`` as a Qwen image is."""
    from PIL import Image

    size = {"shortest_edge": side * side, "longest_edge": side * side}
    temporal, patch = processor.temporal_patch_size, processor.patch_size

    def video(clip) -> torch.Tensor:
        images = [Image.fromarray(f).resize((side, side)) for f in sample_frames(clip, frames)]
        pixels = processor(images=images, size=size, return_tensors="pt")["pixel_values"]
        return video_patches(pixels, frames, temporal, pixels.shape[-1] // (temporal * patch * patch), patch)
    return video
