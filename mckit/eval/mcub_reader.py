"""Reading MCUB files: every item checked when the file is loaded, before any model runs.

One split is a JSON list of items and a separate answer file in the same schema
(:mod:`mckit.eval.mcub` writes the toy world's)::

    {"id": "MCUB-4-test-0000",
     "conversations": [{"from": "human", "value": "video : <video> . image : <image> . ... options ..."},
                       {"from": "gpt", "value": "B"}],            # answer file only
     "modal_inputs": {"video": ["media/test/video/bako-low-1.npy"], "vision": [...], ...}}

``modal_inputs`` lists each modality's files in the order of its placeholders;
paths are relative to the benchmark root. A malformed file raises
:class:`MCUBError`, one line naming the file and the item.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mckit.models.batch import PLACEHOLDER
from mckit.world.entities import MODALITIES

#: MCUB's ``modal_inputs`` keys for the kit's modality names.
SCHEMA_KEY = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}
MODALITY_OF_KEY = {**{v: k for k, v in SCHEMA_KEY.items()}, "image": "image", "pointcloud": "point"}
#: Letters of up to eight options.
OPTION_LETTERS = "ABCDEFGH"
#: Option markers: ``(A)`` / ``( A )`` anywhere; ``A.`` / ``A)`` at a line's start or after a space.
_OPTION_MARKS = (re.compile(r"\(\s*([A-H])\s*\)"), re.compile(r"(?<!\S)([A-H])[.)](?=\s)"))
#: Where an option's text ends: the line's end or the kit's `` . `` separator.
_OPTION_END = re.compile(r"\n|\s+\.(?=\s|$)")
#: A gold letter as written in answer files: ``B``, ``(B)``, ``B.``, ``B)``.
_GOLD_LETTER = re.compile(r"\(?\s*([A-H])\s*\)?\.?")


class MCUBError(ValueError):
    """A malformed benchmark file; the message names the file and the item."""


@dataclass
class MCUBItem:
    """One benchmark item: the human turn (with placeholders), its options and media files.

    ``media[m]`` lists modality ``m``'s files in placeholder order; ``answer`` is the gold
    reply (a letter for multiple choice), ``options`` the option texts in letter order
    (empty for open questions).
    """

    id: str | int
    prompt: str
    media: dict[str, list[Path]]
    answer: str | None = None
    options: list[str] = field(default_factory=list)
    task: str = ""

    @property
    def modalities(self) -> list[str]:
        """Modalities in the order their placeholders appear in the prompt."""
        return PLACEHOLDER.findall(self.prompt)


def parse_options(prompt: str) -> list[str]:
    """Option texts in letter order, from ``(A) text`` or ``A. text`` options, one per line or inline.

    Bracketed markers are looked for first. An option's text runs to the next marker,
    the end of its line or the kit's `` . `` separator (``( A ) colour ( B ) size .
    answer ...``); a full stop that ends the prompt is dropped. Raises
    :class:`MCUBError` if the markers are not A, B, C, ... in order or an option is empty.
    """
    for pattern in _OPTION_MARKS:
        marks = list(pattern.finditer(prompt))
        if len(marks) < 2:
            continue
        letters = [m.group(1) for m in marks]
        if letters != list(OPTION_LETTERS[:len(letters)]):
            raise MCUBError(f"options are not lettered A, B, C, ... in order: {letters}")
        ends = [m.start() for m in marks[1:]] + [len(prompt)]
        texts = [_option_text(prompt[m.end():end], end == len(prompt)) for m, end in zip(marks, ends)]
        for letter, text in zip(letters, texts):
            if not text:
                raise MCUBError(f"option {letter} has no text")
        return texts
    return []


def _option_text(span: str, last: bool) -> str:
    """The text of one option from the span after its marker (see :func:`parse_options`)."""
    text, *rest = _OPTION_END.split(span, maxsplit=1)
    if last and not "".join(rest).strip():
        text = text.strip().removesuffix(".")
    return text.strip()


#: JSON's names for the types ``json.loads`` returns.
_JSON_TYPE = {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object",
              type(None): "null"}


def _json_type(value) -> str:
    """``value``'s JSON type and a short repr: ``number 1``, ``list ['A']``, ``null``."""
    name = _JSON_TYPE.get(type(value), type(value).__name__)
    return name if value is None else f"{name} {reprlib.repr(value)}"


def _read_json(path: Path) -> list[dict]:
    """A JSON list of objects (records), or :class:`MCUBError` naming the file and the bad record."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MCUBError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MCUBError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise MCUBError(f"{path}: expected a JSON list of items, got {_JSON_TYPE.get(type(data))}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise MCUBError(f"{path}: record {i} is a {_JSON_TYPE.get(type(rec))}, expected a JSON object")
    return data


def _record_id(record: dict, source: Path, index: int) -> str | int:
    """The ``id`` of ``source``'s record number ``index``: a string or an integer."""
    if "id" not in record:
        raise MCUBError(f"{source}: record {index} has no 'id'")
    item_id = record["id"]
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise MCUBError(f"{source}: record {index}: 'id' must be a string or an integer, got {_json_type(item_id)}")
    return item_id


def _turn(record: dict, who: str, where: str) -> str | None:
    """The value of ``record``'s first ``who`` turn (``"human"``: the prompt, ``"gpt"``: the answer), or None."""
    turns = record.get("conversations", [])
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise MCUBError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
    values = [t.get("value") for t in turns if t.get("from") == who]
    if values and not isinstance(values[0], str):
        role = "the prompt (human turn)" if who == "human" else "the answer (gpt turn)"
        raise MCUBError(f"{where}: {role} must be a JSON string, got {_json_type(values[0])}")
    return values[0] if values else None


def _gold(path: Path) -> dict[str | int, str]:
    """The answer file: ``{id: gold reply}``; an id given twice must have the same answer."""
    gold: dict[str | int, str] = {}
    for i, rec in enumerate(_read_json(path)):
        item_id = _record_id(rec, path, i)
        where = f"{path}: item {item_id!r}"
        answer = _turn(rec, "gpt", where)
        if answer is None:
            raise MCUBError(f"{where}: no gpt turn (the gold answer)")
        if gold.get(item_id, answer) != answer:
            raise MCUBError(f"{where}: conflicting answers {gold[item_id]!r} and {answer!r}")
        gold[item_id] = answer
    return gold


def _media(record: dict, root: Path, where: str) -> dict[str, list[Path]]:
    """``modal_inputs`` as {modality: [files]} resolved against ``root``; every file must exist."""
    entries = record.get("modal_inputs", {})
    if not isinstance(entries, dict):
        raise MCUBError(f"{where}: 'modal_inputs' must be an object {{key: [paths]}}, got {_json_type(entries)}")
    media: dict[str, list[Path]] = {}
    keys: dict[str, str] = {}
    for key, paths in entries.items():
        if key not in MODALITY_OF_KEY:
            raise MCUBError(f"{where}: unknown modal_inputs key {key!r}; expected one of {sorted(MODALITY_OF_KEY)}")
        mod = MODALITY_OF_KEY[key]
        if mod in media:
            raise MCUBError(f"{where}: modal_inputs has two entries for {mod}: {keys[mod]!r} and {key!r}")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise MCUBError(f"{where}: modal_inputs[{key!r}] must be a path or a list of paths, "
                            f"got {_json_type(paths)}")
        media[mod], keys[mod] = [root / p for p in paths], key
        for p in media[mod]:
            if not p.is_file():
                raise MCUBError(f"{where}: missing {mod} file {p}")
    return media


def _check_placeholders(prompt: str, media: dict[str, list[Path]], where: str) -> None:
    """Every placeholder names a modality, and each modality has one file per placeholder."""
    found = PLACEHOLDER.findall(prompt)
    unknown = [p for p in found if p not in MODALITIES]
    if unknown:
        raise MCUBError(f"{where}: unknown placeholder <{unknown[0]}>; valid modalities: {', '.join(MODALITIES)}")
    for mod in MODALITIES:
        n_ph = found.count(mod)
        if mod not in media and n_ph:
            raise MCUBError(f"{where}: {n_ph} <{mod}> placeholder(s) but no modal_inputs entry {SCHEMA_KEY[mod]!r}")
        if mod in media and n_ph != len(media[mod]):
            raise MCUBError(f"{where}: {n_ph} <{mod}> placeholder(s) but {len(media[mod])} {mod} file(s)")


def _gold_letter(answer: str, options: list[str], where: str) -> str:
    """The bare option letter of a multiple-choice gold answer (``B``, ``(B)``, ``B.``)."""
    letters = OPTION_LETTERS[:len(options)]
    found = _GOLD_LETTER.fullmatch(answer.strip())
    if found is None or found.group(1) not in letters:
        raise MCUBError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    return found.group(1)


def _item(record: dict, item_id: str | int, answer: str | None, root: Path, where: str) -> MCUBItem:
    """One question record -> :class:`MCUBItem`, everything checked (``answer``: its gold reply, if known)."""
    prompt = _turn(record, "human", where)
    if prompt is None:
        raise MCUBError(f"{where}: needs a human turn in 'conversations'")
    media = _media(record, root, where)
    _check_placeholders(prompt, media, where)
    try:
        options = parse_options(prompt)
    except MCUBError as err:
        raise MCUBError(f"{where}: {err}") from None
    if options and answer is not None:
        answer = _gold_letter(answer, options, where)
    return MCUBItem(item_id, prompt, media, answer, options, record.get("task", ""))


def _unique_ids(records: list[dict], source: Path) -> list[str | int]:
    """The records' ids; a duplicated id is an error that names it."""
    ids = [_record_id(rec, source, i) for i, rec in enumerate(records)]
    repeated = {i: n for i, n in Counter(ids).items() if n > 1}
    if repeated:
        named = ", ".join(f"{i!r} ({n} times)" for i, n in repeated.items())
        raise MCUBError(f"{source}: duplicated item ids: {named}")
    return ids


def _answers(records: list[dict], ids: list, gold: dict | None, questions: Path, answers: Path | None) -> list:
    """Each question's gold reply: from the answer file, else its own gpt turn. A question without one is an
    error if there is an answer file or other questions have one."""
    out = [_turn(rec, "gpt", f"{questions}: item {i!r}") for rec, i in zip(records, ids)]
    out = [gold.get(i, o) for i, o in zip(ids, out)] if gold is not None else out
    missing = [i for i, a in zip(ids, out) if a is None]
    if missing and (gold is not None or len(missing) < len(ids)):
        why = f"no answer in {answers}" if gold is not None else "no answer (no gpt turn), while other items have one"
        raise MCUBError(f"{questions}: item {missing[0]!r}: {why}")
    return out


def load_split(questions: str | Path, answers: str | Path | None = None, root: str | Path | None = None) -> list[MCUBItem]:
    """Read one split in MCUB's schema; media paths are resolved against ``root``.

    ``answers`` (optional): the answer file (same schema, gpt turn = gold). Without
    it, gold answers are read from the question file's own gpt turns, if any.
    ``root`` defaults to the folder above the question file's folder (the kit's
    layout: ``root/MCUB-4/test.json`` with ``root/media/...``). Everything is checked
    here, before any model runs: a malformed file raises :class:`MCUBError` naming
    the file and the item (a missing media file, a placeholder without a file or of
    no known modality, a duplicated id, a question without an answer, conflicting
    answers, an answer that is not one option letter, a value of the wrong JSON type).
    A multiple-choice answer is stored as its bare letter.
    """
    questions = Path(questions)
    root = Path(root) if root is not None else questions.parent.parent
    answers = Path(answers) if answers is not None else None
    gold = _gold(answers) if answers is not None else None
    records = _read_json(questions)
    ids = _unique_ids(records, questions)
    replies = _answers(records, ids, gold, questions, answers)
    return [_item(rec, i, a, root, f"{questions}: item {i!r}") for rec, i, a in zip(records, ids, replies)]


def load_media(path: Path) -> np.ndarray:
    """One media file as float32. The toy world stores ``.npy``; other formats need a decoder."""
    if path.suffix != ".npy":
        raise MCUBError(f"{path}: no decoder for {path.suffix!r} files; decode it with the source model's "
                        "processor and pass arrays instead")
    return np.load(path).astype(np.float32)
