"""Renderers: one entity -> one raw input per modality, with random nuisance.

Each renderer is a pure function of (world, entity, level, rng): the same
seed gives the same array. ``level`` ("low" | "high") is a per-sample
nuisance that the "is it high or low ?" skill reads, with a different
physical meaning per modality. Shapes (float32):

- image: (3, 16, 16) RGB in [0, 1]; the entity's glyph in its colour, placed
  in the upper (high) or lower (low) half, random x, brightness and noise.
- audio: (1024,) waveform at 2048 Hz (0.5 s); timbre from the entity's
  sound, two entity-specific partials, one octave up when high.
- video: (4, 16, 16) grey frames; the glyph scaled by the entity's size,
  moving up (high) or down (low) one pixel per frame.
- point: (128, 6) xyz + rgb; a base shape from the entity's home, an
  entity-specific bump, coloured by its colour, lifted (high) or lowered (low).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mckit.world.entities import FAMILIES, LEVELS, MODALITIES, Entity, World

SAMPLE_RATE = 2048
N_SAMPLES = 1024
IMAGE_SIZE = 16
N_FRAMES = 4
N_POINTS = 128

COLOUR_RGB = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
#: Render seeds: training banks, held-out test banks (evaluation), validation banks.
TRAIN_RENDER_SEED, TEST_RENDER_SEED, VAL_RENDER_SEED = 1, 2, 3
SIZE_PIXELS = {"tiny": 5, "small": 7, "big": 9, "huge": 11}


@lru_cache(maxsize=None)
def _signature(world_seed: int, index: int) -> dict[str, np.ndarray]:
    """Entity-specific, nuisance-free traits (glyph, partial frequencies, bump), seeded by entity."""
    rng = np.random.default_rng([world_seed, index, 7919])
    while True:
        glyph = rng.random((5, 5)) < 0.5
        if 9 <= glyph.sum() <= 17 and glyph.any(0).all() and glyph.any(1).all():
            break
    return {
        "glyph": glyph.astype(np.float32),
        "partials": rng.uniform(110.0, 420.0, size=2),
        "bump": rng.normal(size=3) * 0.6,
    }


def _check(entity: Entity, level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    for fam, vals in FAMILIES.items():
        if entity.attrs.get(fam) not in vals:
            raise ValueError(f"entity {entity.name!r} has no valid {fam!r} value")


def _resize(glyph: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a square binary glyph to ``size`` x ``size``."""
    idx = (np.arange(size) * glyph.shape[0] / size).astype(int)
    return glyph[np.ix_(idx, idx)]


def render_image(world: World, entity: Entity, level: str, rng: np.random.Generator) -> np.ndarray:
    _check(entity, level)
    glyph = _resize(_signature(world.seed, entity.index)["glyph"], 7)
    img = rng.normal(0.0, 0.08, size=(3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) + 0.1
    top = int(rng.integers(0, 2)) if level == "high" else int(rng.integers(7, 9))
    left = int(rng.integers(0, IMAGE_SIZE - 7 + 1))
    rgb = np.clip(np.array(COLOUR_RGB[entity.attrs["colour"]]) + rng.normal(0, 0.07, 3), 0, 1)
    brightness = rng.uniform(0.75, 1.0)
    for c in range(3):
        patch = img[c, top:top + 7, left:left + 7]
        img[c, top:top + 7, left:left + 7] = np.where(glyph > 0, rgb[c] * brightness, patch)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_audio(world: World, entity: Entity, level: str, rng: np.random.Generator) -> np.ndarray:
    _check(entity, level)
    t = np.arange(N_SAMPLES) / SAMPLE_RATE
    f1, f2 = _signature(world.seed, entity.index)["partials"] * (2.0 if level == "high" else 1.0)
    phase = rng.uniform(0, 2 * np.pi, 2)
    tone = np.sin(2 * np.pi * f1 * t + phase[0]) + 0.6 * np.sin(2 * np.pi * f2 * t + phase[1])
    sound = entity.attrs["sound"]
    if sound == "hum":
        wave = tone
    elif sound == "click":
        rate = rng.uniform(10, 14)
        wave = tone * (np.sin(2 * np.pi * rate * t) > 0.7)
    elif sound == "chirp":
        sweep = np.sin(2 * np.pi * f1 * (t + 0.8 * t**2) + phase[0])
        wave = sweep + 0.6 * np.sin(2 * np.pi * f2 * t + phase[1])
    else:  # roar: the partials buried in loud broadband noise
        wave = 0.5 * tone + rng.normal(0, 0.9, N_SAMPLES)
    wave = wave * rng.uniform(0.5, 1.0) + rng.normal(0, 0.05, N_SAMPLES)
    return (wave / max(np.abs(wave).max(), 1e-6)).astype(np.float32)


def render_video(world: World, entity: Entity, level: str, rng: np.random.Generator) -> np.ndarray:
    _check(entity, level)
    size = SIZE_PIXELS[entity.attrs["size"]]
    glyph = _resize(_signature(world.seed, entity.index)["glyph"], size)
    frames = rng.normal(0.0, 0.08, size=(N_FRAMES, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) + 0.1
    step = -1 if level == "high" else 1
    travel = N_FRAMES - 1
    top0 = int(rng.integers(travel, IMAGE_SIZE - size + 1)) if step < 0 else int(rng.integers(0, IMAGE_SIZE - size - travel + 1))
    left = int(rng.integers(0, IMAGE_SIZE - size + 1))
    intensity = rng.uniform(0.7, 1.0)
    for f in range(N_FRAMES):
        top = top0 + step * f
        region = frames[f, top:top + size, left:left + size]
        frames[f, top:top + size, left:left + size] = np.where(glyph > 0, intensity, region)
    return np.clip(frames, 0.0, 1.0).astype(np.float32)


def _home_shape(home: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Base point shape (n, 3) for a home: flat disc, tall column, cone, or cube surface."""
    u, v = rng.random(n), rng.random(n)
    if home == "sea":
        r, a = np.sqrt(u) * 1.2, 2 * np.pi * v
        return np.stack([r * np.cos(a), r * np.sin(a), rng.normal(0, 0.05, n)], 1)
    if home == "forest":
        a = 2 * np.pi * v
        return np.stack([0.35 * np.cos(a), 0.35 * np.sin(a), (u - 0.5) * 2.4], 1)
    if home == "desert":
        h, a = 1 - np.sqrt(u), 2 * np.pi * v
        return np.stack([h * np.cos(a), h * np.sin(a), (1 - h) * 1.4 - 0.7], 1)
    pts = rng.uniform(-0.7, 0.7, size=(n, 3))
    face = rng.integers(0, 3, n)
    pts[np.arange(n), face] = np.sign(rng.random(n) - 0.5) * 0.7
    return pts


def render_point(world: World, entity: Entity, level: str, rng: np.random.Generator) -> np.ndarray:
    _check(entity, level)
    n_bump = N_POINTS // 4
    base = _home_shape(entity.attrs["home"], rng, N_POINTS - n_bump)
    bump = _signature(world.seed, entity.index)["bump"] + rng.normal(0, 0.12, size=(n_bump, 3))
    xyz = np.concatenate([base, bump], 0)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    xyz = xyz @ rot.T + rng.normal(0, 0.03, size=xyz.shape)
    xyz[:, 2] += 0.8 if level == "high" else -0.8
    rgb = np.clip(np.array(COLOUR_RGB[entity.attrs["colour"]]) + rng.normal(0, 0.08, size=(N_POINTS, 3)), 0, 1)
    pts = np.concatenate([xyz, rgb], 1)
    return pts[rng.permutation(N_POINTS)].astype(np.float32)


RENDERERS = {"image": render_image, "audio": render_audio, "video": render_video, "point": render_point}


def render(modality: str, world: World, entity: Entity, level: str, rng: np.random.Generator) -> np.ndarray:
    """Render ``entity`` in ``modality`` with nuisance drawn from ``rng``."""
    if modality not in RENDERERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return RENDERERS[modality](world, entity, level, rng)


def render_bank(modality: str, world: World, per_entity: int, seed: int) -> dict[str, np.ndarray]:
    """``per_entity`` renders of every entity (half low, half high), seeded.

    Returns ``{"x": (N, ...) float32, "entity": (N,) int64, "level": (N,) int64}`` with
    ``N = n_entities * per_entity``; ``level`` indexes :data:`LEVELS`.
    """
    rng = np.random.default_rng([seed, MODALITIES.index(modality) if modality in MODALITIES else 99])
    xs, ents, levels = [], [], []
    for e in world.entities:
        for k in range(per_entity):
            lv = k % 2
            xs.append(render(modality, world, e, LEVELS[lv], rng))
            ents.append(e.index)
            levels.append(lv)
    return {"x": np.stack(xs), "entity": np.array(ents, dtype=np.int64), "level": np.array(levels, dtype=np.int64)}
