"""The toy world: entities with attribute families, seeded and balanced.

Every entity has one value in each attribute family (colour, size, sound,
home). Values are balanced: in a world of 32 entities each of the 4 values
of a family is held by exactly 8 entities, so a "most frequent value" guess
carries no information. Entity names are made-up two-syllable words, so the
language model can only learn what they mean from the generated text.

Modalities render an entity (see :mod:`mckit.world.render`): identity is visible
in every modality, but each modality shows one family natively (an image
shows the colour, a sound its timbre, a video the size, a point cloud the
shape of its home). The instruction "describe it" asks for that native
family, so the same prompt wants a different answer family per modality: a
skill the single-modality models learn separately and that conflicts when
their language models are merged. A second skill, "is it high or low ?",
reuses the same two answer words with a different physical meaning per
modality (vertical position, pitch register, motion direction, elevation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FAMILIES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow"),
    "size": ("tiny", "small", "big", "huge"),
    "sound": ("hum", "click", "chirp", "roar"),
    "home": ("sea", "forest", "desert", "city"),
}
MODALITIES: tuple[str, ...] = ("image", "audio", "video", "point")
#: The family each modality shows natively: the answer to "describe it".
NATIVE_FAMILY: dict[str, str] = {"image": "colour", "audio": "sound", "video": "size", "point": "home"}
LEVELS: tuple[str, ...] = ("low", "high")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Entity:
    """One entity: its index, made-up name and one value per attribute family."""

    index: int
    name: str
    attrs: dict[str, str] = field(hash=False)

    def value(self, family: str) -> str:
        return self.attrs[family]


@dataclass(frozen=True)
class World:
    """A seeded set of entities; the single source of truth for every dataset."""

    seed: int
    entities: tuple[Entity, ...]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entities]

    def by_name(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(f"no entity named {name!r} in this world")

    def with_value(self, family: str, value: str) -> list[Entity]:
        return [e for e in self.entities if e.attrs[family] == value]


def make_names(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct consonant-vowel-consonant-vowel names (e.g. ``"bako"``)."""
    names: set[str] = set()
    while len(names) < n:
        c = rng.choice(list(_CONSONANTS), size=2)
        v = rng.choice(list(_VOWELS), size=2)
        names.add(f"{c[0]}{v[0]}{c[1]}{v[1]}")
    return sorted(names)


def balanced_attributes(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Attribute dicts for ``n`` entities: every value equally frequent, no two entities identical.

    Each family is an independent shuffle of its values repeated ``n / len(values)``
    times; shuffles are redrawn until all ``n`` value tuples are distinct.
    """
    for fam, vals in FAMILIES.items():
        if n % len(vals):
            raise ValueError(f"n_entities={n} is not a multiple of {len(vals)} values in family {fam!r}")
    for _ in range(1000):
        columns = {f: rng.permutation(np.repeat(np.arange(len(v)), n // len(v))) for f, v in FAMILIES.items()}
        tuples = {tuple(int(columns[f][i]) for f in FAMILIES) for i in range(n)}
        if len(tuples) == n:
            return [{f: FAMILIES[f][int(columns[f][i])] for f in FAMILIES} for i in range(n)]
    raise RuntimeError("could not draw distinct attribute tuples; use fewer entities")


def make_world(seed: int = 0, n_entities: int = 32) -> World:
    """The seeded toy world: ``n_entities`` named entities with balanced attributes."""
    rng = np.random.default_rng(seed)
    names = make_names(n_entities, rng)
    attrs = balanced_attributes(n_entities, rng)
    return World(seed=seed, entities=tuple(Entity(i, nm, a) for i, (nm, a) in enumerate(zip(names, attrs))))
