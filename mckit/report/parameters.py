"""Checks of the notebooks' parameters, with messages a student can act on.

Every notebook calls :func:`check_parameters` in the cell right after its
``parameters`` cell, with every parameter it declares. A bad value stops there
with one line naming the parameter, what is wrong, and what to write instead,
rather than an IndexError or an assertion deep inside a later cell.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mckit.eval.mcub import SPLITS, load_benchmark
from mckit.experiments.composition import LAMBDAS
from mckit.experiments.merging_zoo import BENCH_METHODS, MODALITY_SPLIT
from mckit.merge.registry import METHODS, get
from mckit.models.shipped import REGIMES, VARIANTS, world_record
from mckit.storage.paths import DATA_DIR
from mckit.world.entities import MODALITIES


class ParameterError(ValueError):
    """A notebook parameter with a value the notebook cannot use."""


def _fail(name: str, value, problem: str) -> None:
    raise ParameterError(f"{name} = {value!r}: {problem}; change it in the parameters cell")


def _choice(options: tuple) -> Callable:
    def check(name, value, params):
        if value not in options:
            _fail(name, value, f"expected one of {', '.join(map(repr, options))}")
    return check


def _subset(options: tuple, allow_none: bool = False) -> Callable:
    def check(name, value, params):
        if value is None and allow_none:
            return
        if not isinstance(value, (list, tuple)) or not value:
            _fail(name, value, f"expected a non-empty list of {', '.join(map(repr, options))}")
        bad = [v for v in value if v not in options]
        if bad or len(set(value)) != len(value):
            _fail(name, value, f"{bad[0]!r} is not one of {', '.join(map(repr, options))}" if bad
                  else "each value may appear once")
    return check


def _count(minimum: int = 1, allow_none: bool = False) -> Callable:
    def check(name, value, params):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(name, value, f"expected a whole number >= {minimum}" + (" or None" if allow_none else ""))
    return check


def _flag(name, value, params):
    if not isinstance(value, bool):
        _fail(name, value, "expected True or False")


#: The shipped folder each ``*_DIR`` parameter defaults to (None).
SHIPPED = {"WORLD_DIR": "world", "BENCH_DIR": "mcub", "EXPERTS_DIR": "experts"}


def _directory(name, value, params):
    if value is not None and not Path(value).is_dir():
        _fail(name, value, "no such directory (None uses the kit's shipped data)")
    if value is None and not (DATA_DIR / SHIPPED[name]).is_dir():
        _fail(name, value, f"the kit's shipped {DATA_DIR / SHIPPED[name]} is missing: open the notebook from a clone "
                           "of the repository (its data/ folder), or give a directory")


def _n_entities(params) -> int:
    return len(world_record(params.get("WORLD_DIR"))["entities"])


def _entity_problem(value, params) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "expected a whole number >= 0"
    n = _n_entities(params)
    return f"the world has {n} entities, numbered 0 to {n - 1}" if value >= n else None


def _entity(name, value, params):
    if problem := _entity_problem(value, params):
        _fail(name, value, problem)


def _entities(name, value, params):
    if not isinstance(value, (list, tuple)) or not value:
        _fail(name, value, "expected a non-empty list of entity numbers")
    for v in value:
        if problem := _entity_problem(v, params):
            _fail(name, value, f"{v!r}: {problem}")


def _item(name, value, params):
    _count(0)(name, value, params)
    n = len(load_benchmark("MCUB-4", "test", params.get("BENCH_DIR")))
    if value >= n:
        _fail(name, value, f"MCUB-4 has {n} test items, numbered 0 to {n - 1}")


def _split_size(split: str, part: str, params) -> int:
    return len(load_benchmark(split, part, params.get("BENCH_DIR")))


def _at_most_split(part: str, split: str | None = None, allow_none: bool = False) -> Callable:
    """A count of MCUB items that a split holds: ``split``'s, else the smallest of the notebook's ``SPLITS``
    (all splits when None; MCUB-4 when the notebook has no ``SPLITS``)."""
    def check(name, value, params):
        _count(1, allow_none)(name, value, params)
        if value is None:
            return
        names = [split] if split else (params.get("SPLITS") or list(SPLITS)) if "SPLITS" in params else ["MCUB-4"]
        sizes = {s: _split_size(s, part, params) for s in names}
        smallest = min(sizes, key=sizes.get)
        if value > sizes[smallest]:
            _fail(name, value, f"{smallest} has {sizes[smallest]} {part} items; write at most {sizes[smallest]}"
                               + (" (or None for all)" if allow_none else ""))
    return check


def _lambda(name, value, params):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in LAMBDAS:
        _fail(name, value, f"lambda must be a value of the grid {', '.join(map(str, LAMBDAS))} "
                           "(every method was scored at these only)")


def _text_lambdas(name, value, params):
    n = len(SPLITS["MCUB-4"])
    if not isinstance(value, (list, tuple)) or len(value) != n:
        _fail(name, value, f"one lambda per modality of MCUB-4 ({', '.join(SPLITS['MCUB-4'])}): a list of {n}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) <= 1:
            _fail(name, value, f"{v!r}: each lambda is a number from 0 to 1")


def _mask_keep(name, value, params):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
        _fail(name, value, "K is the share of each task vector TIES keeps: a number in (0, 1], e.g. 0.8")


def _mask_lambda(name, value, params):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 2:
        _fail(name, value, "the mask keeps |tau_i| >= lambda * 50% * |tau*|: lambda is a number in (0, 2], e.g. 1.0")


def _mask_weight(name, value, params):
    from mckit.compose.mmer import routable
    from mckit.models.shipped import load_base

    names = [n for n in load_base(params.get("WORLD_DIR")).state_dict() if routable(n)]
    if value not in names:
        _fail(name, value, f"expected the name of one of the LLM's {len(names)} linear weights, e.g. {names[-1]!r}")


def _single_items(name, value, params):
    _count(1)(name, value, params)
    sizes = {m: len(load_benchmark(f"single/{m}", "test", params.get("BENCH_DIR"))) for m in MODALITIES}
    if value > min(sizes.values()):
        _fail(name, value, f"each modality has {min(sizes.values())} single-modality test items; write at most that")


def _device(name, value, params):
    _choice(("auto", "cpu", "cuda"))(name, value, params)
    if value == "cuda" and not torch.cuda.is_available():
        _fail(name, value, "this machine has no GPU that torch can use; write \"auto\" or \"cpu\"")


def _optional_text(name, value, params):
    if value is not None and not isinstance(value, str):
        _fail(name, value, "expected a path as text, or None")


def _optional_dir(name, value, params):
    if value is not None and not Path(value).is_dir():
        _fail(name, value, "no such directory (None: the kit writes a tiny set of its own)")


def _sources(name, value, params):
    if value is None:
        if params.get("BASE") is not None:
            _fail(name, value, "BASE is set: give the sources built on it, e.g. [\"llava-hf/llava-1.5-7b-hf:image\"]")
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        _fail(name, value, "expected a non-empty list of hub ids or folders (\"ID:image,video\" picks modalities)")
    if params.get("BASE") is None:
        _fail(name, value, "SOURCES need their BASE (the language model they were built on)")


def _strength(name, value, params):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 2:
        _fail(name, value, "expected a number in (0, 2], e.g. 0.3 (full fine-tunes turn to gibberish near 1)")


#: MCUB's split files (the published names).
REAL_SPLITS = ("MCUB-4", "MCUB-3-image-audio-video", "MCUB-3-audio-video-pointcloud", "MCUB-3-image-audio-pointcloud",
               "MCUB-3-image-video-pointcloud")

#: Every notebook parameter and its check.
RULES: dict[str, Callable] = {
    "MODE": _choice(("auto", "smoke", "full")),
    "SEED": _count(0),
    "ENTITY": _entity,
    "ENTITIES": _entities,
    "MODALITY": _choice(tuple(MODALITIES)),
    "MODALITIES": _subset(tuple(MODALITIES)),
    "VARIANT": _choice(VARIANTS),
    "MODALITY_VARIANT": _choice(REGIMES),
    "REGIMES": _subset(REGIMES),
    "ITEM": _item,
    "DEVICE": _device,
    "SPLITS": _subset(tuple(SPLITS), allow_none=True),
    "RANK_ABLATION": _flag,
    "N_SMOKE": _at_most_split("test"),
    "N_FULL": _at_most_split("test", allow_none=True),
    "N_MODALITY_SMOKE": _at_most_split("test", MODALITY_SPLIT),
    "N_MODALITY_FULL": _at_most_split("test", MODALITY_SPLIT, allow_none=True),
    "N_MODALITY_VAL_SMOKE": _at_most_split("val", MODALITY_SPLIT),
    "N_MODALITY_VAL_FULL": _at_most_split("val", MODALITY_SPLIT),
    "EXPLORE_METHOD": _choice(tuple(m for m in BENCH_METHODS if get(m).has_lam)),
    "EXPLORE_LAMBDA": _lambda,
    "EXPLORE_LAMBDAS": _text_lambdas,
    "N_TUNE_SMOKE": _at_most_split("val"),
    "N_TUNE_FULL": _at_most_split("val", allow_none=True),
    "N_LIVE": _at_most_split("val", "MCUB-4"),
    "N_COUNT_SMOKE": _at_most_split("test"),
    "N_COUNT_FULL": _at_most_split("test", allow_none=True),
    "MASK_KEEP": _mask_keep,
    "MASK_LAMBDA": _mask_lambda,
    "MASK_WEIGHT": _mask_weight,
    "FORGET_MODALITY": _choice(tuple(MODALITIES)),
    "FORGET_STEPS_SMOKE": _count(1),
    "FORGET_STEPS_FULL": _count(1),
    "N_SINGLE_SMOKE": _single_items,
    "N_SENSITIVITY_SMOKE": _single_items,
    "WORLD_DIR": _directory,
    "BENCH_DIR": _directory,
    "EXPERTS_DIR": _directory,
    "OUT": _optional_text,
    "BASE": _optional_text,
    "SOURCES": _sources,
    "METHOD": _choice((*METHODS, "mmer", "damc")),
    "LAMBDA": _strength,
    "MCUB_DIR": _optional_dir,
    "SPLIT": _choice(REAL_SPLITS),
    "N": _count(1),
    "DTYPE": _choice(("auto", "float32", "bfloat16", "float16")),
    "IMAGE_SIZE": _count(28, allow_none=True),
    "WORK_DIR": _optional_text,
}
#: Counts of items (positive whole numbers) that every ``N_*`` parameter not named above takes.
_POSITIVE = _count(1)


def check_parameters(**params) -> str:
    """Check every notebook parameter given; raise :class:`ParameterError` (one line) at the first bad one.

    Directories are checked before the values that need them (``ENTITY`` reads the world), counts of
    items last (they are checked against the splits the notebook uses).
    Returns "parameters ok" so the cell shows that it ran.
    """
    order = sorted(params, key=lambda n: (not n.endswith("_DIR"), n.startswith("N_")))
    for name in order:
        rule = RULES.get(name, _POSITIVE if name.startswith("N_") else None)
        if rule is None:
            raise ParameterError(f"{name}: no check is known for this parameter (add it to "
                                 "mckit.report.parameters.RULES)")
        rule(name, params[name], params)
    return "parameters ok"
