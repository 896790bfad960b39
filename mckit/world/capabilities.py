"""Five image capabilities for the merging benchmark: analogues of VQA, Geometry, Chart, OCR, Grounding.

The merging benchmark of the OptMerge paper fine-tunes one base MLLM into five
experts (VQA, Geometry, Chart, OCR, Grounding) and merges them. On the toy
world each capability renders its own kind of 3x16x16 image, with random
nuisance, and asks one question whose answer uses the world's vocabulary:

==========  ==========================================  ========================  ======================  ======
task        image                                       question                  answer                  chance
==========  ==========================================  ========================  ======================  ======
vqa         an entity's glyph (the world's image)       what sound does it make ?  the entity's value       1/4
            (needs identity -> the LLM's knowledge)     / where does it live ? /
                                                        what colour is it ?
geometry    one filled square of side 3, 5, 7 or 9 px   what size is it ?         tiny / small / big /    1/4
                                                                                  huge
chart       four bars, one per colour, random heights   what colour is high ?     colour of the tallest   1/4
ocr         an entity's name written in a 3x5 font      what is the word ?        the name, "bako"        1/32
grounding   three coloured squares in a 4x4 grid        where is the red ?        high / low (its half)   1/2
==========  ==========================================  ========================  ======================  ======

:func:`capability_items` draws seeded items; train, validation and test use
different seeds, so evaluation images are never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mckit.world.entities import FAMILIES, LEVELS, World
from mckit.world.render import COLOUR_RGB, IMAGE_SIZE, render_image
from mckit.world.tasks import QUESTION

TASKS: tuple[str, ...] = ("vqa", "geometry", "chart", "ocr", "grounding")
CHANCE = {"vqa": 1 / 4, "geometry": 1 / 4, "chart": 1 / 4, "ocr": 1 / 32, "grounding": 1 / 2}
#: Classes of each task's :attr:`CapabilityItem.label`.
LABEL_CLASSES = {"vqa": 32, "geometry": 4, "chart": 4, "ocr": 32, "grounding": 81}
#: The paper's expert each task stands in for.
#: Families a vqa question asks about (size is left to geometry's "what size is it ?").
VQA_FAMILIES = ("colour", "sound", "home")
SQUARE_SIDES = {"tiny": 3, "small": 5, "big": 7, "huge": 9}
#: A 3x5 pixel font for the letters of entity names ("#" = ink).
FONT = {
    "a": (".#.", "#.#", "###", "#.#", "#.#"), "b": ("##.", "#.#", "##.", "#.#", "##."),
    "d": ("##.", "#.#", "#.#", "#.#", "##."), "e": ("###", "#..", "##.", "#..", "###"),
    "f": ("###", "#..", "##.", "#..", "#.."), "g": (".##", "#..", "#.#", "#.#", ".##"),
    "i": ("###", ".#.", ".#.", ".#.", "###"), "k": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "l": ("#..", "#..", "#..", "#..", "###"), "m": ("#.#", "###", "###", "#.#", "#.#"),
    "n": ("##.", "#.#", "#.#", "#.#", "#.#"), "o": (".#.", "#.#", "#.#", "#.#", ".#."),
    "p": ("##.", "#.#", "##.", "#..", "#.."), "r": ("##.", "#.#", "##.", "#.#", "#.#"),
    "s": (".##", "#..", ".#.", "..#", "##."), "t": ("###", ".#.", ".#.", ".#.", ".#."),
    "u": ("#.#", "#.#", "#.#", "#.#", "###"), "v": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "z": ("###", "..#", ".#.", "#..", "###"),
}
GRID = 4  # grounding: a GRID x GRID grid of 4-pixel cells
PREFIX = "image : <image> ."
#: Seeds of the three parts: items of different parts never share a render.
PART_SEED = {"train": 1, "val": 2, "test": 3}


@dataclass
class CapabilityItem:
    """One item: the task, the question (with the ``<image>`` placeholder), the gold answer, the image.

    ``label`` is what the image shows as one class of :data:`LABEL_CLASSES` [task]
    (vqa: the entity; geometry: the size; chart: the tallest bar's colour; ocr: the
    written name; grounding: the half each colour is in, or its absence); it
    pretrains the general image encoder, never the LLM.
    """

    task: str
    prompt: str
    answer: str
    image: np.ndarray  # (3, 16, 16) float32 in [0, 1]
    label: int


def _canvas(rng: np.random.Generator) -> np.ndarray:
    return (rng.normal(0.0, 0.08, size=(3, IMAGE_SIZE, IMAGE_SIZE)) + 0.1).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, top: int, left: int, colour: str, rng: np.random.Generator) -> None:
    """Paint ``mask`` (h, w bool) at (top, left) in ``colour`` with jittered hue and brightness."""
    rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.normal(0, 0.07, 3), 0, 1) * rng.uniform(0.75, 1.0)
    h, w = mask.shape
    for c in range(3):
        region = img[c, top:top + h, left:left + w]
        img[c, top:top + h, left:left + w] = np.where(mask, rgb[c], region)


def _done(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def vqa(world: World, rng: np.random.Generator) -> CapabilityItem:
    """An entity's glyph; a question about one of its attributes (sound and home need the LLM's knowledge)."""
    entity = world.entities[rng.integers(len(world.entities))]
    family = VQA_FAMILIES[rng.integers(len(VQA_FAMILIES))]
    image = render_image(world, entity, LEVELS[rng.integers(len(LEVELS))], rng)
    return CapabilityItem("vqa", f"{PREFIX} {QUESTION[family]}", entity.attrs[family], image, entity.index)


def geometry(world: World, rng: np.random.Generator) -> CapabilityItem:
    """One filled square; its side (3/5/7/9 px) is the answer's size word. Colour and place are nuisance."""
    size = FAMILIES["size"][rng.integers(4)]
    side = SQUARE_SIDES[size]
    img = _canvas(rng)
    top, left = (int(rng.integers(0, IMAGE_SIZE - side + 1)) for _ in range(2))
    _paint(img, np.ones((side, side), bool), top, left, FAMILIES["colour"][rng.integers(4)], rng)
    return CapabilityItem("geometry", f"{PREFIX} {QUESTION['size']}", size, _done(img), FAMILIES["size"].index(size))


def chart(world: World, rng: np.random.Generator) -> CapabilityItem:
    """A bar chart: one 3-px bar per colour (random order), distinct heights; the tallest bar's colour."""
    colours = [FAMILIES["colour"][i] for i in rng.permutation(4)]
    heights = rng.choice(np.arange(3, IMAGE_SIZE), size=4, replace=False)
    img = _canvas(rng)
    for slot, (colour, height) in enumerate(zip(colours, heights)):
        _paint(img, np.ones((int(height), 3), bool), IMAGE_SIZE - int(height), 4 * slot, colour, rng)
    tallest = colours[int(np.argmax(heights))]
    return CapabilityItem("chart", f"{PREFIX} what colour is high ?", tallest, _done(img),
                          FAMILIES["colour"].index(tallest))


def written(word: str) -> np.ndarray:
    """``word`` in the 3x5 font, one blank column between letters: (5, 4 * len(word) - 1) bool."""
    columns = []
    for i, letter in enumerate(word):
        if letter not in FONT:
            raise ValueError(f"no glyph for letter {letter!r} of {word!r}")
        columns.append(np.array([[ch == "#" for ch in row] for row in FONT[letter]]))
        if i < len(word) - 1:
            columns.append(np.zeros((5, 1), bool))
    return np.concatenate(columns, axis=1)


def ocr(world: World, rng: np.random.Generator) -> CapabilityItem:
    """An entity's name written in the pixel font; the answer reads it."""
    entity = world.entities[rng.integers(len(world.entities))]
    text = written(entity.name)
    img = _canvas(rng)
    top, left = int(rng.integers(0, IMAGE_SIZE - 5 + 1)), int(rng.integers(0, IMAGE_SIZE - text.shape[1] + 1))
    _paint(img, text, top, left, FAMILIES["colour"][rng.integers(4)], rng)
    return CapabilityItem("ocr", f"{PREFIX} what is the word ?", entity.name, _done(img), entity.index)


def grounding(world: World, rng: np.random.Generator) -> CapabilityItem:
    """Three 3x3 squares of different colours in distinct cells of a 4x4 grid; where the asked colour is.

    The answer names the half of the image that holds it: "high" (top two rows of
    cells) or "low" (bottom two), the words the world uses for position.
    """
    colours = [FAMILIES["colour"][i] for i in rng.permutation(4)[:3]]
    cells = rng.choice(GRID * GRID, size=3, replace=False)
    img = _canvas(rng)
    for colour, cell in zip(colours, cells):
        row, col = divmod(int(cell), GRID)
        _paint(img, np.ones((3, 3), bool), 4 * row + int(rng.integers(0, 2)), 4 * col + int(rng.integers(0, 2)),
               colour, rng)
    halves = {colour: int(cell) // GRID >= GRID // 2 for colour, cell in zip(colours, cells)}  # False: high
    asked = colours[int(rng.integers(3))]
    layout = sum((1 + int(halves[c])) * 3 ** i if c in halves else 0 for i, c in enumerate(FAMILIES["colour"]))
    return CapabilityItem("grounding", f"{PREFIX} where is the {asked} ?", ("high", "low")[halves[asked]], _done(img),
                          layout)


MAKERS = {"vqa": vqa, "geometry": geometry, "chart": chart, "ocr": ocr, "grounding": grounding}


def capability_items(world: World, task: str, n: int, part: str, seed: int = 0) -> list[CapabilityItem]:
    """``n`` seeded items of ``task`` for ``part`` ("train" | "val" | "test")."""
    if task not in MAKERS:
        raise ValueError(f"unknown capability task {task!r}; expected one of {TASKS}")
    if part not in PART_SEED:
        raise ValueError(f"part must be one of {tuple(PART_SEED)}, got {part!r}")
    rng = np.random.default_rng([seed, PART_SEED[part], TASKS.index(task), 97])
    return [MAKERS[task](world, rng) for _ in range(n)]


def mixed_items(world: World, tasks: tuple[str, ...], n: int, rng: np.random.Generator) -> list[CapabilityItem]:
    """``n`` training items drawn uniformly over ``tasks`` (one expert: one task; multi-task: all five)."""
    return [MAKERS[tasks[i]](world, rng) for i in rng.integers(0, len(tasks), size=n)]
