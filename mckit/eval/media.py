"""Real media of MCUB files, decoded for a source model's processor: images with PIL, audio with soundfile,
video frames with PyAV, point clouds from ``.npy``.

Each decoder returns what a processor takes: a PIL RGB image; mono float32 samples at :data:`SAMPLE_RATE`;
``frames`` RGB frames (F, H, W, 3) uint8 sampled evenly over the video; an (N, 6) float32 point cloud
(xyz + rgb). A format the kit cannot decode is an error naming the file and the formats it can.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

#: File suffixes the kit decodes, per modality.
FORMATS = {"image": (".jpg", ".jpeg", ".png", ".webp", ".bmp"), "audio": (".wav", ".flac"),
           "video": (".mp4", ".avi", ".mkv", ".webm", ".mov"), "point": (".npy",)}
#: MCUB's audio rate (Hz) and frames per video.
SAMPLE_RATE, FRAMES = 16_000, 8


class MediaError(ValueError):
    """A media file the kit cannot decode."""


def check_format(path: Path, modality: str) -> None:
    if modality not in FORMATS:
        raise MediaError(f"{path}: unknown modality {modality!r}; known: {', '.join(FORMATS)}")
    if path.suffix.lower() not in FORMATS[modality]:
        raise MediaError(f"{path}: {modality} files of type {path.suffix or '(none)'!r} are not supported; "
                         f"use {', '.join(FORMATS[modality])}")
    if not path.is_file():
        raise MediaError(f"{path}: file not found")


def decode_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def decode_audio(path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at ``rate`` Hz (averaged over channels; resampled with a polyphase filter)."""
    import soundfile
    from scipy.signal import resample_poly

    samples, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if source_rate != rate:
        ratio = Fraction(rate, source_rate)
        mono = resample_poly(mono, ratio.numerator, ratio.denominator).astype(np.float32)
    return mono


def decode_video(path: Path, frames: int = FRAMES) -> np.ndarray:
    """``frames`` RGB frames (F, H, W, 3) uint8 at evenly spaced indices of the decoded stream."""
    import av

    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not decoded:
        raise MediaError(f"{path}: no video frame could be decoded")
    index = np.linspace(0, len(decoded) - 1, frames).round().astype(int)
    return np.stack([decoded[i] for i in index])


def decode_point(path: Path) -> np.ndarray:
    cloud = np.load(path).astype(np.float32)
    if cloud.ndim != 2 or cloud.shape[1] != 6:
        raise MediaError(f"{path}: a point cloud is (N, 6) xyz + rgb, got shape {cloud.shape}")
    return cloud


DECODERS = {"image": decode_image, "audio": decode_audio, "video": decode_video, "point": decode_point}


def decode(path: str | Path, modality: str):
    """One media file of ``modality`` decoded (see the module doc); bad files raise :class:`MediaError`."""
    path = Path(path)
    check_format(path, modality)
    try:
        return DECODERS[modality](path)
    except MediaError:
        raise
    except Exception as err:  # noqa: BLE001 - a decoder's own error, reported with the file
        raise MediaError(f"{path}: cannot decode this {modality} file ({type(err).__name__}: {err})") from None
