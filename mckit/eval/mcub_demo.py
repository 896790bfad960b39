"""A tiny MCUB split in the published layout (question file, one answer file, real media files), for running the
real evaluation path without the benchmark's media. Random content: mechanics only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mckit.eval.mcub_reader import SCHEMA_KEY
from mckit.eval.media import SAMPLE_RATE

#: The file each modality is written as.
SUFFIX = {"image": "jpg", "video": "mp4", "audio": "wav", "point": "npy"}


def _write(path: Path, modality: str, rng: np.random.Generator) -> None:
    if modality == "image":
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    elif modality == "video":
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for _ in range(10):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
    elif modality == "audio":
        import soundfile

        soundfile.write(str(path), (0.1 * rng.standard_normal(SAMPLE_RATE // 2)).astype(np.float32), SAMPLE_RATE)
    else:
        np.save(path, rng.standard_normal((64, 6)).astype(np.float32))


def write_mcub(root: Path, n: int = 3, modalities: tuple[str, ...] = ("image", "video")) -> Path:
    """``n`` items in MCUB's published layout under ``root``: ``MCUB-4.json`` (questions with one placeholder per
    modality and four options), ``MCUB-answer.json`` (gold letters A, B, C, D, A ...) and one media file per
    modality and item (jpg, mp4, wav, npy)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True, exist_ok=True)
    questions, answers = [], []
    for i in range(n):
        media = {}
        for mod in modalities:
            name = f"media/{i}-{mod}.{SUFFIX[mod]}"
            _write(root / name, mod, rng)
            media[SCHEMA_KEY[mod]] = [name]
        slots = " ".join(f"<{m}>" for m in modalities)
        human = {"from": "human", "value": f"w5 {slots} w7 w{8 + i} (A) w10 (B) w11 (C) w12 (D) w13"}
        questions.append({"id": i, "conversations": [human], "modal_inputs": media})
        answers.append({"id": i, "conversations": [human, {"from": "gpt", "value": "ABCD"[i % 4]}]})
    (root / "MCUB-4.json").write_text(json.dumps(questions))
    (root / "MCUB-answer.json").write_text(json.dumps(answers))
    return root
