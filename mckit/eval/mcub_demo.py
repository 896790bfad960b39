"""A tiny MCUB split in the published layout (question file, one answer file, real jpg and mp4 media), for
running the real evaluation path without the benchmark's media. Random pixels: mechanics only."""

from __future__ import annotations

from pathlib import Path


def write_mcub(root: Path, n: int = 3) -> Path:
    """A tiny MCUB split in the published layout: ``MCUB-4.json``, ``MCUB-answer.json``, a jpg and an mp4 per item."""
    import json

    import av
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True, exist_ok=True)
    questions, answers = [], []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "media" / f"{i}.jpg")
        with av.open(str(root / "media" / f"{i}.mp4"), "w") as out:
            stream = out.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for _ in range(10):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        human = {"from": "human", "value": f"w5 <image> w6 <video> w7 w{8 + i} (A) w10 (B) w11 (C) w12 (D) w13"}
        questions.append({"id": i, "conversations": [human],
                          "modal_inputs": {"vision": [f"media/{i}.jpg"], "video": [f"media/{i}.mp4"]}})
        answers.append({"id": i, "conversations": [human, {"from": "gpt", "value": "ABCD"[i % 4]}]})
    (root / "MCUB-4.json").write_text(json.dumps(questions))
    (root / "MCUB-answer.json").write_text(json.dumps(answers))
    return root
