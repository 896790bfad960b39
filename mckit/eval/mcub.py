"""MCUB on the toy world, in MCUB's own file schema, and a loader for real MCUB files.

One split is a JSON list of items and a separate answer file in the same schema::

    {"id": "MCUB-4-test-0000",
     "conversations": [{"from": "human", "value": "video : <video> . image : <image> . ... options ..."},
                       {"from": "gpt", "value": "B"}],            # answer file only
     "modal_inputs": {"video": ["media/test/video/bako-low-1.npy"], "vision": [...], ...}}

``modal_inputs`` lists each modality's files in the order of its placeholders;
paths are relative to the benchmark root. ``python -m mckit build-mcub`` writes
``data/mcub``: MCUB-4 and the four MCUB-3 subsets (test and val), and per
modality a single-modality test set (identify / attribute / describe / level)
used for retention. Entity combinations of test and val items come from their
own hash buckets (:func:`mckit.world.tasks.combo_split`), never seen in training.
Reading (:func:`load_split`, :class:`MCUBItem`, :class:`MCUBError`, ...) lives in
:mod:`mckit.eval.mcub_reader` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np

from mckit.eval.mcub_reader import (  # noqa: F401
    MODALITY_OF_KEY,
    OPTION_LETTERS,
    SCHEMA_KEY,
    MCUBError,
    MCUBItem,
    load_media,
    load_split,
    parse_options,
)
from mckit.storage.atomic import atomic_dir
from mckit.storage.paths import DATA_DIR
from mckit.world.entities import FAMILIES, LEVELS, MODALITIES, World
from mckit.world.render import render
from mckit.world.tasks import (
    LETTERS,
    MODALITY_TASKS,
    Example,
    Slots,
    commonality,
    reply_letter,
)

#: Split name -> its modalities (MCUB-4 and the four MCUB-3 subsets).
SPLITS: dict[str, tuple[str, ...]] = {
    "MCUB-4": ("image", "audio", "video", "point"),
    "MCUB-3-image-audio-video": ("image", "audio", "video"),
    "MCUB-3-audio-video-point": ("audio", "video", "point"),
    "MCUB-3-image-audio-point": ("image", "audio", "point"),
    "MCUB-3-image-video-point": ("image", "video", "point"),
}
#: Single-modality tasks kept for retention (a model's own skills).
SINGLE_TASKS = ("identify", "attribute", "describe", "level")
#: Distinct renders per (modality, entity, level) in the media pool of each part.
RENDERS = {"test": 3, "val": 2}
RENDER_SEED = {"test": 2, "val": 3}


# --------------------------------------------------------------------------- writing

def media_name(part: str, modality: str, entity: str, level: int, render_index: int) -> str:
    """Path of one render in the media pool, relative to the benchmark root."""
    return f"media/{part}/{modality}/{entity}-{LEVELS[level]}-{render_index}.npy"


def _record(item_id: str, ex: Example, world: World, part: str, rng: np.random.Generator) -> dict:
    """An answer-file record (human + gpt turns); its question record drops the gpt turn."""
    modal_inputs = {SCHEMA_KEY[m]: [media_name(part, m, world.entities[e].name, lv, int(rng.integers(RENDERS[part])))
                                    for e, lv in pairs] for m, pairs in ex.inputs.items()}
    turns = [{"from": "human", "value": ex.prompt}, {"from": "gpt", "value": ex.answer}]
    return {"id": item_id, "task": ex.task.split(":")[0], "conversations": turns, "modal_inputs": modal_inputs}


def mcub_examples(world: World, modalities: tuple[str, ...], n: int, part: str, seed: int) -> list[Example]:
    """``n`` commonality items over ``modalities`` in random placeholder order.

    Gold letters and shared families are balanced: every run of 16 items holds each
    (family, letter) pair once, so no prior over either beats chance.
    """
    key = [seed, len(modalities), sum(MODALITIES.index(m) for m in modalities), list(RENDERS).index(part), 61]
    if len(modalities) == 2:        # image + point and audio + video share an index sum
        key.append(min(MODALITIES.index(m) for m in modalities))
    rng = np.random.default_rng(key)
    out = []
    for i in range(n):
        order = [modalities[j] for j in rng.permutation(len(modalities))]
        ex = commonality(world, rng, Slots(None, rng), modalities=order, answer="letter", split=part,
                         gold_at=i % len(LETTERS), family=list(FAMILIES)[(i // len(LETTERS)) % len(FAMILIES)])
        out.append(dataclasses.replace(ex, answer=reply_letter(ex.answer)))     # MCUB's gold: the letter alone
    return out


def single_examples(world: World, modality: str, n: int, seed: int) -> list[Example]:
    """``n`` single-modality items of ``modality``, an equal share of each of :data:`SINGLE_TASKS`."""
    rng = np.random.default_rng([seed, MODALITIES.index(modality), 71])
    return [MODALITY_TASKS[SINGLE_TASKS[i % len(SINGLE_TASKS)]](world, rng, Slots(modality, rng)) for i in range(n)]


def _write_split(folder: Path, prefix: str, examples: list[Example], world: World, part: str, seed: int) -> set[str]:
    """Write ``{part}.json`` and ``{part}_answers.json``; returns the media files they reference."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, len(examples), 81])
    answers = [_record(f"{prefix}-{part}-{i:04d}", ex, world, part, rng) for i, ex in enumerate(examples)]
    questions = [{**rec, "conversations": rec["conversations"][:1]} for rec in answers]
    (folder / f"{part}.json").write_text(json.dumps(questions, indent=1))
    (folder / f"{part}_answers.json").write_text(json.dumps(answers, indent=1))
    return {p for q in questions for paths in q["modal_inputs"].values() for p in paths}


def _write_media(root: Path, world: World, paths: set[str]) -> None:
    """Render every referenced media file (float16 ``.npy``), seeded by its name."""
    for rel in sorted(paths):
        _, part, modality, stem = rel.split("/")
        name, level, r = stem.removesuffix(".npy").split("-")
        rng = np.random.default_rng([RENDER_SEED[part], MODALITIES.index(modality), world.by_name(name).index,
                                     LEVELS.index(level), int(r)])
        x = render(modality, world, world.by_name(name), level, rng)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, x.astype(np.float16))


def build_benchmark(out: str | Path, world: World, n_test: int = 400, n_val: int = 100, n_single: int = 200,
                    seed: int = 0, overwrite: bool = False) -> dict[str, int]:
    """Write MCUB-4, the MCUB-3 subsets and the single-modality sets under ``out`` (atomically).

    Returns the number of items per file written.
    """
    for name, value in (("n_test", n_test), ("n_val", n_val), ("n_single", n_single)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a whole number >= 1, got {value!r}")
    counts: dict[str, int] = {}
    with atomic_dir(Path(out), overwrite) as tmp:
        media: set[str] = set()
        for split, mods in SPLITS.items():
            for part, n in (("test", n_test), ("val", n_val)):
                media |= _write_split(tmp / split, split, mcub_examples(world, mods, n, part, seed), world, part, seed)
                counts[f"{split}/{part}"] = n
        for mod in MODALITIES:
            media |= _write_split(tmp / "single" / mod, f"single-{mod}", single_examples(world, mod, n_single, seed),
                                  world, "test", seed)
            counts[f"single/{mod}/test"] = n_single
        _write_media(tmp, world, media)
    return counts


def subsets(k: int) -> dict[str, tuple[str, ...]]:
    """Split name -> modalities of every ``k`` of the four modalities, named as MCUB names its subsets
    (``MCUB-4``, ``MCUB-3-image-audio-video``, ...). MCUB has k = 4 and 3 (:data:`SPLITS`); the pairs
    (``MCUB-2-image-audio``, ...) are the kit's, written on demand by :func:`write_test_splits`."""
    if k == len(MODALITIES):
        return {"MCUB-4": MODALITIES}
    return {f"MCUB-{k}-" + "-".join(c): c for c in itertools.combinations(MODALITIES, k)}


def write_test_splits(out: str | Path, world: World, splits: dict[str, tuple[str, ...]], n_test: int,
                      seed: int = 0) -> None:
    """The test part of each of ``splits`` (name -> modalities) and its media in a new folder ``out``, item for item
    as :func:`build_benchmark` writes a split (:func:`load_benchmark` reads them with ``root=out``)."""
    with atomic_dir(Path(out)) as tmp:
        media: set[str] = set()
        for split, mods in splits.items():
            media |= _write_split(tmp / split, split, mcub_examples(world, mods, n_test, "test", seed), world, "test",
                                  seed)
        _write_media(tmp, world, media)


def text_items(world: World, split: str, n: int, visible: int | None = None, part: str = "test",
               seed: int = 0) -> list[MCUBItem]:
    """The items of ``split`` as text: each input becomes ``name : X`` (validity guards, text upper bounds).

    ``visible``: keep only the first ``visible`` inputs (``1``: a model that knows one
    entity's name and nothing else); the question and options are unchanged.
    """
    items = []
    for i, ex in enumerate(mcub_examples(world, SPLITS[split], n, part, seed)):
        queue = {m: [world.entities[e].name for e, _ in pairs] for m, pairs in ex.inputs.items()}
        slots = re.findall(r"(\w+) : <\1> \.", ex.prompt)
        names = [queue[m].pop(0) for m in slots]
        body = " ".join(f"name : {nm} ." for nm in names[:visible])
        question = ex.prompt[ex.prompt.index("what do they"):]
        items.append(MCUBItem(f"{split}-text-{i:04d}", f"{body} {question}", {}, ex.answer, parse_options(question),
                              "common"))
    return items


def one_entity_oracle(world: World, split: str, n: int, part: str = "test", seed: int = 0) -> float:
    """Expected accuracy of an ideal reasoner that knows everything about the FIRST input's entity only.

    It keeps the options that entity holds (always including the right one) and
    guesses among them: the ceiling of a single-modality model on a split.
    """
    accs = []
    for ex in mcub_examples(world, SPLITS[split], n, part, seed):
        first = re.search(r"(\w+) : <\1> \.", ex.prompt).group(1)
        entity = world.entities[ex.inputs[first][0][0]]
        held = sum(v in entity.attrs.values() for v in parse_options(ex.prompt))
        accs.append(1 / held)
    return float(np.mean(accs))


def default_root() -> Path:
    """``data/mcub`` of the repository this package lives in."""
    return DATA_DIR / "mcub"


def load_benchmark(split: str, part: str = "test", root: str | Path | None = None) -> list[MCUBItem]:
    """A split of the kit's benchmark (``"MCUB-4"``, ``"MCUB-3-..."``, ``"single/image"``, ...)."""
    root = Path(root) if root is not None else default_root()
    folder = root / split
    if not (folder / f"{part}.json").is_file():
        raise FileNotFoundError(f"no {split}/{part}.json under {root}: build it with `python -m mckit build-mcub`")
    return load_split(folder / f"{part}.json", folder / f"{part}_answers.json", root)


def add_parser(sub) -> None:
    p = sub.add_parser("build-mcub", help="write MCUB-4, MCUB-3 and single-modality sets of the toy world")
    p.add_argument("--out", default=str(default_root()))
    p.add_argument("--world", default=None, help="toy world directory (default: data/world)")
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from mckit.models.shipped import load_world

    counts = build_benchmark(args.out, load_world(args.world), args.n_test, args.n_val, overwrite=args.overwrite)
    print(json.dumps(counts, indent=1))
    return 0
