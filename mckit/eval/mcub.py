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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mckit.storage.atomic import atomic_dir
from mckit.storage.paths import DATA_DIR
from mckit.world.entities import FAMILIES, LEVELS, MODALITIES, World
from mckit.world.render import render
from mckit.world.tasks import LETTERS, MODALITY_TASKS, Example, Slots, commonality

#: Split name -> its modalities (MCUB-4 and the four MCUB-3 subsets).
SPLITS: dict[str, tuple[str, ...]] = {
    "MCUB-4": ("image", "audio", "video", "point"),
    "MCUB-3-image-audio-video": ("image", "audio", "video"),
    "MCUB-3-audio-video-point": ("audio", "video", "point"),
    "MCUB-3-image-audio-point": ("image", "audio", "point"),
    "MCUB-3-image-video-point": ("image", "video", "point"),
}
#: MCUB's ``modal_inputs`` keys for the kit's modality names.
SCHEMA_KEY = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}
MODALITY_OF_KEY = {**{v: k for k, v in SCHEMA_KEY.items()}, "image": "image", "pointcloud": "point"}
#: Single-modality tasks kept for retention (a model's own skills).
SINGLE_TASKS = ("identify", "attribute", "describe", "level")
#: Distinct renders per (modality, entity, level) in the media pool of each part.
RENDERS = {"test": 3, "val": 2}
RENDER_SEED = {"test": 2, "val": 3}
_OPTION = re.compile(r"\(\s*([A-H])\s*\)\s*(.+?)(?=\s*\(\s*[A-H]\s*\)|\s+\.\s|\s*\.?\s*$)")
_OPTION_LINE = re.compile(r"(?m)^\s*([A-H])[.)]\s*(.+?)\s*$")


class MCUBError(ValueError):
    """A malformed benchmark file; the message names the file and the item."""


@dataclass
class MCUBItem:
    """One benchmark item: the human turn (with placeholders), its options and media files.

    ``media[m]`` lists modality ``m``'s files in placeholder order; ``answer`` is the gold
    reply (a letter for multiple choice), ``options`` the option texts in letter order
    (empty for open questions).
    """

    id: str
    prompt: str
    media: dict[str, list[Path]]
    answer: str | None = None
    options: list[str] = field(default_factory=list)
    task: str = ""

    @property
    def modalities(self) -> list[str]:
        """Modalities in the order their placeholders appear in the prompt."""
        return [m for m in re.findall(r"<([A-Za-z_]+)>", self.prompt)]


def parse_options(prompt: str) -> list[str]:
    """Option texts in letter order: ``( A ) colour ( B ) size`` or one ``A. text`` per line."""
    for pattern in (_OPTION, _OPTION_LINE):
        found = pattern.findall(prompt)
        if len(found) >= 2:
            letters = [f[0] for f in found]
            if letters != list("ABCDEFGH"[:len(letters)]):
                raise MCUBError(f"options are not lettered A, B, C, ... in order: {letters}")
            return [f[1].strip() for f in found]
    return []


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
    rng = np.random.default_rng([seed, len(modalities), sum(MODALITIES.index(m) for m in modalities),
                                 list(RENDERS).index(part), 61])
    out = []
    for i in range(n):
        order = [modalities[j] for j in rng.permutation(len(modalities))]
        ex = commonality(world, rng, Slots(None, rng), modalities=order, answer="letter", split=part,
                         gold_at=i % len(LETTERS), family=list(FAMILIES)[(i // len(LETTERS)) % len(FAMILIES)])
        out.append(ex)
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


# --------------------------------------------------------------------------- reading

def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MCUBError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise MCUBError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise MCUBError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _turn(record: dict, who: str) -> str | None:
    for turn in record.get("conversations", []):
        if turn.get("from") == who:
            return turn.get("value")
    return None


def _item(record: dict, answers: dict[str, str], root: Path, source: Path) -> MCUBItem:
    item_id = record.get("id")
    where = f"{source}: item {item_id!r}"
    prompt = _turn(record, "human")
    if item_id is None or prompt is None:
        raise MCUBError(f"{where}: needs an 'id' and a human turn in 'conversations'")
    media: dict[str, list[Path]] = {}
    for key, paths in record.get("modal_inputs", {}).items():
        if key not in MODALITY_OF_KEY:
            raise MCUBError(f"{where}: unknown modal_inputs key {key!r}; expected one of {sorted(MODALITY_OF_KEY)}")
        mod = MODALITY_OF_KEY[key]
        media[mod] = [root / p for p in ([paths] if isinstance(paths, str) else paths)]
        for p in media[mod]:
            if not p.is_file():
                raise MCUBError(f"{where}: missing {mod} file {p}")
        if prompt.count(f"<{mod}>") != len(media[mod]):
            raise MCUBError(f"{where}: {prompt.count(f'<{mod}>')} <{mod}> placeholder(s) but {len(media[mod])} file(s)")
    try:
        options = parse_options(prompt)
    except MCUBError as err:
        raise MCUBError(f"{where}: {err}") from None
    answer = answers.get(item_id, _turn(record, "gpt"))
    letters = "ABCDEFGH"[:len(options)]
    if options and answer is not None and (not answer.strip() or answer.strip()[0] not in letters):
        raise MCUBError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    return MCUBItem(item_id, prompt, media, answer, options, record.get("task", ""))


def load_split(questions: str | Path, answers: str | Path | None = None, root: str | Path | None = None) -> list[MCUBItem]:
    """Read one split in MCUB's schema; media paths are resolved against ``root``.

    ``answers`` (optional): the answer file (same schema, gpt turn = gold). Without
    it, gold answers are read from the question file's own gpt turns, if any.
    ``root`` defaults to the folder above the question file's folder (the kit's
    layout: ``root/MCUB-4/test.json`` with ``root/media/...``). Raises
    :class:`MCUBError` naming the file and item for a missing media file, a
    placeholder without a file, or an answer letter that is not an option.
    """
    questions = Path(questions)
    root = Path(root) if root is not None else questions.parent.parent
    gold = {}
    if answers is not None:
        for rec in _read_json(Path(answers)):
            if rec.get("id") is not None and _turn(rec, "gpt") is not None:
                gold[rec["id"]] = _turn(rec, "gpt")
    items = [_item(rec, gold, root, questions) for rec in _read_json(questions)]
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise MCUBError(f"{questions}: duplicated item ids")
    return items


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


def load_media(path: Path) -> np.ndarray:
    """One media file as float32. The toy world stores ``.npy``; other formats need a decoder."""
    if path.suffix != ".npy":
        raise MCUBError(f"{path}: no decoder for {path.suffix!r} files; decode it with the source model's "
                        "processor and pass arrays instead")
    return np.load(path).astype(np.float32)


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
