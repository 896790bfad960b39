"""The one registry of merging methods: name, display name, options with defaults and ranges, needs.

Every caller reads this table: the pure functions' callers (:func:`resolve`),
the streaming engine, the ``merge`` command line, composition and the merging
benchmark. It imports no torch, so the command line can check a whole request
(and the engine run its torch-free linear kernel) before torch is loaded; the
functions themselves live in :mod:`mckit.merge.methods` and are looked up by
name on first use (``Method.fn``).
"""

from __future__ import annotations

import importlib
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass


# --------------------------------------------------------------- value checks
def check_fraction(name: str, value: float, *, closed_low: bool = False, closed_high: bool = True) -> float:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval.

    Default interval: ``(0, 1]`` (``keep``, ``rank_ratio``); DARE's ``drop`` uses
    ``[0, 1)`` because the rescale ``1 / (1 - drop)`` is undefined at 1.
    """
    value = float(value)
    low_ok = value >= 0 if closed_low else value > 0
    high_ok = value <= 1 if closed_high else value < 1
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _finite(name: str, value: float) -> float:
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _positive(name: str, value: float) -> float:
    if not (_finite(name, value) > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def _count(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value}")
    return int(value)


def _divisor(name: str, value: str) -> str:
    if value not in ("count", "weight"):
        raise ValueError(f"{name} must be 'count' or 'weight', got {value!r}")
    return value


def _optional_fraction(name: str, value: float | None) -> float | None:
    return None if value is None else check_fraction(name, value)


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: its default, its check (raises ``ValueError``) and its help line."""

    name: str
    default: object
    check: Callable[[str, object], object]
    help: str


LAM = Option("lam", 1.0, _finite, "scale of the merged task vector: theta = theta_0 + lam * merged")
KEEP_TIES = Option("keep", 0.2, check_fraction, "TIES trim: fraction of each task vector's entries KEPT, in (0, 1]")
KEEP_DARE_TIES = Option("keep", 1.0, check_fraction, "TIES trim after DARE: fraction KEPT (1.0: no trim)")
DROP = Option("drop", 0.2, lambda n, v: check_fraction(n, v, closed_low=True, closed_high=False),
              "DARE: probability of dropping an entry, in [0, 1)")
BY = Option("by", "count", _divisor, "TIES disjoint mean divisor: 'count' (paper, PEFT) or 'weight' (mergekit)")
WEIGHTS = Option("weights", None, lambda n, v: v, "per-expert weights w_i (default all 1)")
SEED = Option("seed", 0, lambda n, v: int(v), "DARE: seed of the masks (combined with each tensor's name)")
RANK_RATIO = Option("rank_ratio", None, _optional_fraction, "OptMerge: rank k as a fraction of min(m, d) "
                    "(None: min(m, d) // n)")
STEPS = Option("steps", 300, _count, "WUDI/OptMerge: optimiser steps")
LR_FULL = Option("lr", 1e-5, _positive, "WUDI/OptMerge: learning rate (Adam)")
LR_LORA = Option("lr", 1e-4, _positive, "OptMerge LoRA: learning rate (SGD, momentum 0.9)")


@dataclass(frozen=True)
class Method:
    """A merging method and everything a caller needs to know about it."""

    name: str                       # API and command-line name; the function's name in mckit.merge.methods
    label: str                      # display name in tables and plots
    paper: str                      # citation
    options: tuple[Option, ...] = ()
    reads_base: bool = True         # False: the base only fixes the shape (weight average)
    linear_kernel: bool = False     # the engine runs it as a torch-free block kernel
    global_scope: bool = False      # accepts a global (whole-model) magnitude top-k
    seeded: bool = False            # random masks, seeded per tensor name (DARE)
    lora_variant: str | None = None  # the method to use on LoRA task vectors (OptMerge)

    @property
    def fn(self) -> Callable:
        """The pure function ``fn(theta_0, thetas, **options) -> theta`` (imports torch)."""
        return getattr(importlib.import_module("mckit.merge.methods"), self.name)

    @property
    def has_lam(self) -> bool:
        return any(o.name == "lam" for o in self.options)

    def defaults(self) -> dict:
        """Every option's default: ``{"lam": 1.0, "keep": 0.2, ...}``."""
        return {o.name: o.default for o in self.options}

    def resolve(self, options: dict) -> dict:
        """Defaults overridden by ``options``, each checked; unknown options raise ``ValueError``."""
        accepted = {o.name: o for o in self.options}
        unknown = set(options) - set(accepted)
        if unknown:
            raise ValueError(f"option(s) {', '.join(sorted(unknown))} do not apply to method {self.name}; "
                             f"it accepts: {', '.join(sorted(accepted)) or 'none'}")
        out = self.defaults()
        for name, value in options.items():
            out[name] = accepted[name].check(name, value)
        return out


_OPTIMISED = (LAM, LR_FULL, STEPS)
_REGISTRY = (
    Method("average", "Weight average", "Wortsman et al. 2022", (), reads_base=False, linear_kernel=True),
    Method("task_arithmetic", "Task arithmetic", "Ilharco et al. 2023", (LAM,), linear_kernel=True),
    Method("ties", "TIES", "Yadav et al. 2023", (KEEP_TIES, LAM, BY, WEIGHTS), global_scope=True),
    Method("dare_ta", "TA+DARE", "Yu et al. 2024", (DROP, LAM, SEED), seeded=True),
    Method("dare_ties", "TIES+DARE", "Yu et al. 2024", (DROP, KEEP_DARE_TIES, LAM, BY, WEIGHTS, SEED),
           global_scope=True, seeded=True),
    Method("tsv", "TSV-M", "Gargiulo et al. 2025", (LAM,)),
    Method("iso_c", "Iso-C", "Marczak et al. 2025", (LAM,)),
    Method("wudi", "WUDI", "Cheng et al. 2025", _OPTIMISED),
    Method("optmerge", "OptMerge", "Wei et al. 2025", (*_OPTIMISED, RANK_RATIO), lora_variant="optmerge_lora"),
    Method("optmerge_lora", "OptMerge (LoRA)", "Wei et al. 2025", (LAM, LR_LORA, STEPS, RANK_RATIO)),
)
#: name -> :class:`Method`, in the order tables show them.
METHODS: dict[str, Method] = {m.name: m for m in _REGISTRY}
#: Options the engine fills in itself, never taken from a user.
ENGINE_OPTIONS = ("seed", "thresholds", "losses")


def get(name: str) -> Method:
    """The :class:`Method` called ``name``; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def for_regime(name: str, regime: str) -> Method:
    """The method to run on task vectors of ``regime`` ("full" or "lora"): OptMerge has a LoRA variant."""
    method = get(name)
    return get(method.lora_variant) if regime == "lora" and method.lora_variant else method


def user_options(name: str) -> tuple[str, ...]:
    """Options a user may set for ``name`` (what the command line offers)."""
    return tuple(o.name for o in get(name).options if o.name not in ENGINE_OPTIONS and o.name != "weights")


def tensor_seed(seed: int, name: str) -> int:
    """Seed of one tensor's random masks (DARE), the same in memory and streamed: stable across runs and processes.

    ``(seed * 1_000_003 + crc32(name)) mod 2^62``; expert i then draws from ``tensor_seed + i``.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**62)
