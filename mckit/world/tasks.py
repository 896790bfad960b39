"""Generated instruction data: the text the base LM reads and the tasks the MLLMs learn.

An :class:`Example` is one user prompt and the assistant's answer. Prompts
name their inputs with *slots*: in text data a slot is ``"name : bako"`` (the
entity's name written out); in modality data it is ``"image : <image>"``, a
placeholder the MLLM replaces with projected features. Because the text the
base LM was pretrained on already has ``name : X`` where the features will
go, a projector only has to learn to make features "read like" the name:
the alignment trick that makes a tiny LM composable.

Tasks (each a function ``(world, rng, slot_maker) -> Example``):
identify, attribute, describe (modality-native family), level (high/low),
commonality (what do these have in common, options A-D, answer with the
letter or with the word), text facts, and the letter drill.

A lettered commonality answer names the word first and the letter after it
(``red , and the letter is C``): a 4-layer LM cannot infer the shared value and
look up its letter in one step, but it can look up the letter of a word it
has just written, once the drill has taught it to (see :func:`drill`).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mckit.world.entities import FAMILIES, LEVELS, NATIVE_FAMILY, Entity, World

SYSTEM = "a chat between a user and an assistant ."
LETTERS = ("A", "B", "C", "D")
QUESTION = {
    "colour": "what colour is it ?",
    "size": "what size is it ?",
    "sound": "what sound does it make ?",
    "home": "where does it live ?",
}
COMMON_QUESTION = "what do they have in common ?"
ANSWER_WITH = {"letter": "answer with the letter .", "word": "answer with the word ."}
#: A lettered commonality answer: the shared value, then the letter in front of it among the options.
LETTER_REPLY = "{word} , and the letter is {letter}"
DRILL_PROMPT = "tell me the letter ."
_NAMED = re.compile(r"the letter is ([A-D])\b")


def letter_reply(word: str, letter: str) -> str:
    """The world's lettered answer: ``letter_reply("red", "C") == "red , and the letter is C"``."""
    return LETTER_REPLY.format(word=word, letter=letter)


def reply_letter(reply: str) -> str | None:
    """The letter a :func:`letter_reply` names (None if ``reply`` names none)."""
    found = _NAMED.search(reply)
    return found.group(1) if found else None


@dataclass
class Example:
    """One instruction: ``prompt`` (may hold placeholders), ``answer``, and the inputs behind them.

    ``inputs`` maps a modality to the entities its placeholders show, in order of
    appearance, as ``(entity index, level index)`` pairs; a data source turns them
    into raw renders or cached encoder features.
    """

    prompt: str
    answer: str
    inputs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    task: str = ""


def chat(prompt: str, answer: str | None = None) -> str:
    """Vicuna-style chat template; with ``answer=None`` it ends where the assistant starts."""
    head = f"{SYSTEM} USER : {prompt} ASSISTANT :"
    return head if answer is None else f"{head} {answer} </s>"


class Slots:
    """Writes one slot per entity: ``name : bako`` (text) or ``image : <image>`` (a modality)."""

    def __init__(self, modality: str | None, rng: np.random.Generator):
        self.modality, self.rng = modality, rng
        self.inputs: dict[str, list[tuple[int, int]]] = {}
        self.levels: list[int] = []

    def __call__(self, entity: Entity, modality: str | None = None) -> str:
        mod = modality or self.modality
        if mod is None:
            return f"name : {entity.name}"
        level = int(self.rng.integers(0, len(LEVELS)))
        self.inputs.setdefault(mod, []).append((entity.index, level))
        self.levels.append(level)
        return f"{mod} : <{mod}>"


def identify(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    e = world.entities[rng.integers(len(world.entities))]
    return Example(f"{slots(e)} what is this ?", f"this is a {e.name}", slots.inputs, "identify")


def attribute(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    e = world.entities[rng.integers(len(world.entities))]
    fam = list(FAMILIES)[rng.integers(len(FAMILIES))]
    return Example(f"{slots(e)} {QUESTION[fam]}", e.attrs[fam], slots.inputs, f"attribute:{fam}")


def choice(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    """An attribute question with lettered options (all four values of the family, shuffled).

    Teaches the letter lookup on its own: find the value among the options, answer
    with the letter in front of it (the step a commonality letter answer ends with).
    """
    e = world.entities[rng.integers(len(world.entities))]
    fam = list(FAMILIES)[rng.integers(len(FAMILIES))]
    options = [FAMILIES[fam][i] for i in rng.permutation(len(FAMILIES[fam]))]
    prompt = f"{slots(e)} {QUESTION[fam]} {format_options(options)} . {ANSWER_WITH['letter']}"
    return Example(prompt, LETTERS[options.index(e.attrs[fam])], slots.inputs, "choice")


def describe(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    """Modality-specific: the same words ask for a different family in each modality."""
    if slots.modality is None:
        raise ValueError("describe is a modality task; it has no text form")
    e = world.entities[rng.integers(len(world.entities))]
    return Example(f"{slots(e)} describe it .", e.attrs[NATIVE_FAMILY[slots.modality]], slots.inputs, "describe")


def level(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    """Modality-specific: "high"/"low" means position, pitch, motion or elevation."""
    if slots.modality is None:
        raise ValueError("level is a modality task; it has no text form")
    e = world.entities[rng.integers(len(world.entities))]
    prompt = f"{slots(e)} is it high or low ?"
    return Example(prompt, LEVELS[slots.levels[-1]], slots.inputs, "level")


def fact(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    """Plain text facts, with the name inside the question."""
    e = world.entities[rng.integers(len(world.entities))]
    if rng.random() < 0.5:
        a = e.attrs
        return Example(
            f"tell me about the {e.name} .",
            f"the {e.name} is {a['colour']} , {a['size']} , makes a {a['sound']} sound and lives in the {a['home']} .",
            {}, "fact",
        )
    fam = list(FAMILIES)[rng.integers(len(FAMILIES))]
    return Example(f"the {e.name} . {QUESTION[fam]}", e.attrs[fam], {}, f"fact:{fam}")


#: The partner task's mapping: entity i lives with entity (i + PARTNER_SHIFT) mod N.
PARTNER_SHIFT = 7


def partner(world: World, rng: np.random.Generator, slots: Slots) -> Example:
    """A task no model of the world was ever trained on (MMER's forgetting protocol): "what lives with it ?" ->
    the name of entity (i + :data:`PARTNER_SHIFT`) mod N. Every word exists in the vocabulary, but the pairing is
    a fact set of its own that appears in no text, no other task and no stage of training."""
    e = world.entities[rng.integers(len(world.entities))]
    mate = world.entities[(e.index + PARTNER_SHIFT) % len(world.entities)]
    return Example(f"{slots(e)} what lives with it ?", mate.name, slots.inputs, "partner")


#: Share of entity combinations (of any size) in each split, assigned by a hash of the combination.
COMBO_SPLITS = {"test": 0.2, "val": 0.1, "train": 0.7}


def combo_split(entities: list[Entity]) -> str:
    """The split a set of entities belongs to: "train", "val" or "test" (order-free, deterministic).

    Commonality questions are drawn per split, so the entity combinations of the
    benchmark's test and validation items never occur in any training data.
    """
    key = ",".join(str(i) for i in sorted(e.index for e in entities)).encode()
    u = zlib.crc32(key) / 2**32
    edge = 0.0
    for split, share in COMBO_SPLITS.items():
        edge += share
        if u < edge:
            return split
    return "train"


def common_entities(world: World, rng: np.random.Generator, k: int, split: str = "train",
                    family: str | None = None) -> tuple[list[Entity], str]:
    """``k`` distinct entities of ``split`` sharing exactly one family's value; returns them and that family.

    The shared family is ``family``, or drawn uniformly, so no family is a better guess than another.
    """
    if split not in COMBO_SPLITS:
        raise ValueError(f"split must be one of {sorted(COMBO_SPLITS)}, got {split!r}")
    fams = list(FAMILIES)
    for _ in range(100_000):
        fam = family or fams[rng.integers(len(fams))]
        value = FAMILIES[fam][rng.integers(len(FAMILIES[fam]))]
        pool = world.with_value(fam, value)
        chosen = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
        shared = [f for f in fams if len({e.attrs[f] for e in chosen}) == 1]
        if shared == [fam] and combo_split(chosen) == split:
            return chosen, fam
    raise RuntimeError(f"no {k} entities of split {split!r} share exactly one family in this world")


def commonality_options(entities: list[Entity], common_family: str, rng: np.random.Generator) -> list[str]:
    """One option per family: the shared value, and per other family a near miss, shuffled.

    A near miss is the value held by the most (but not all) of the entities, ties
    broken at random, so that one entity alone rules out as few options as possible.
    (One entity still always holds the right value, and holds a near miss only
    sometimes: a model that sees one input can beat chance, never reach certainty.)
    """
    options = []
    for fam in FAMILIES:
        values = [e.attrs[fam] for e in entities]
        if fam == common_family:
            options.append(values[0])
            continue
        counts = Counter(values)
        top = max(counts.values())
        best = sorted(v for v, c in counts.items() if c == top)
        options.append(best[rng.integers(len(best))])
    return [options[i] for i in rng.permutation(len(options))]


def place_gold(options: list[str], gold: str, at: int) -> list[str]:
    """``options`` reordered so that ``gold`` sits at index ``at`` (to balance gold letters)."""
    rest = [o for o in options if o != gold]
    return rest[:at] + [gold] + rest[at:]


def format_options(options: list[str]) -> str:
    return " ".join(f"( {letter} ) {value}" for letter, value in zip(LETTERS, options))


def commonality(world: World, rng: np.random.Generator, slots: Slots, k: int | None = None,
                modalities: list[str] | None = None, answer: str | None = None, split: str = "train",
                gold_at: int | None = None, family: str | None = None) -> Example:
    """What do these ``k`` entities have in common? Four options, one per family; one value is shared.

    ``modalities`` gives one modality per slot (MCUB-style mixed inputs); by default
    every slot uses ``slots``' own modality (or text). ``answer`` is "letter" or "word".
    ``split`` picks the entity combinations (see :func:`combo_split`); ``gold_at``
    puts the right option at that index and ``family`` fixes the shared family
    (defaults: random).
    """
    k = k or (len(modalities) if modalities else int(rng.integers(2, 5)))
    mods = modalities or [None] * k
    entities, fam = common_entities(world, rng, k, split, family)
    gold = entities[0].attrs[fam]
    options = commonality_options(entities, fam, rng)
    if gold_at is not None:
        options = place_gold(options, gold, gold_at)
    answer = answer or ("letter" if rng.random() < 0.5 else "word")
    reply = letter_reply(gold, LETTERS[options.index(gold)]) if answer == "letter" else gold
    body = " ".join(f"{slots(e, m)} ." for e, m in zip(entities, mods))
    prompt = f"{body} {COMMON_QUESTION} {format_options(options)} . {ANSWER_WITH[answer]}"
    return Example(prompt, reply, slots.inputs, f"common:{answer}")


#: Share of drill option lists held out of training (by a hash of the ordered list), to measure binding.
DRILL_TEST_SHARE = 0.2


def drill_split(options: list[str]) -> str:
    """"test" for the held-out share of ordered option lists, else "train" (deterministic)."""
    u = zlib.crc32(("drill:" + ",".join(options)).encode()) / 2**32
    return "test" if u < DRILL_TEST_SHARE else "train"


def drill(world: World, rng: np.random.Generator, slots: Slots, split: str = "train") -> Example:
    """The letter drill: four lettered options, answered by every option followed by its letter.

    ``( A ) red ( B ) big ( C ) hum ( D ) sea . tell me the letter .`` ->
    ``sea D , red A , hum C , big B`` (options in a random order). One value per
    family, shuffled, as in commonality options. Pretraining starts with the drill
    alone, which binds each option word to the letter in front of it; the lettered
    answers of :func:`commonality` then only need that lookup after the word.
    """
    fams = list(FAMILIES)
    for _ in range(1000):
        values = [FAMILIES[f][rng.integers(len(FAMILIES[f]))] for f in fams]
        options = [values[i] for i in rng.permutation(len(values))]
        if drill_split(options) == split:
            break
    else:
        raise RuntimeError(f"no drill option list of split {split!r} in 1000 draws")
    reply = " , ".join(f"{options[i]} {LETTERS[i]}" for i in rng.permutation(len(options)))
    return Example(f"{format_options(options)} . {DRILL_PROMPT}", reply, {}, "drill")


TEXT_TASKS = {"fact": fact, "identify": identify, "attribute": attribute, "choice": choice, "common": commonality,
              "drill": drill}
MODALITY_TASKS = {"identify": identify, "attribute": attribute, "choice": choice, "describe": describe,
                  "level": level, "common": commonality}


def sample(world: World, rng: np.random.Generator, modality: str | None, mix: dict[str, float]) -> Example:
    """Draw one example: a task by the weights in ``mix``, in ``modality`` (None = text)."""
    table = TEXT_TASKS if modality is None else MODALITY_TASKS
    unknown = set(mix) - set(table)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} for modality {modality!r}; known: {sorted(table)}")
    names = list(mix)
    p = np.array([mix[n] for n in names], dtype=float)
    name = names[rng.choice(len(names), p=p / p.sum())]
    return table[name](world, rng, Slots(modality, rng))


def corpus_words(world: World) -> list[str]:
    """Every word any task can produce (for training the word-level tokenizer)."""
    rng = np.random.default_rng(0)
    words = set(chat("x", "x").split()) | set(LETTERS) | set(LEVELS) | set(world.names) | set(FAMILIES)
    for fam, values in FAMILIES.items():
        words |= set(values) | set(QUESTION[fam].split())
    for sentence in (COMMON_QUESTION, *ANSWER_WITH.values(), letter_reply("", ""), DRILL_PROMPT,
                     "( ) . , : describe it is it high or low ?",
                     "what is this ? this is a", "name image audio video point"):
        words |= set(sentence.split())
    for _ in range(50):
        ex = fact(world, rng, Slots(None, rng))
        words |= set(ex.prompt.split()) | set(ex.answer.split())
    words -= {"x", "<s>", "</s>", "<pad>", "<unk>"}
    return sorted(words)
