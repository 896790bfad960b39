"""Names of the merging methods, the options each accepts, and their checks (no torch import).

The merge command line and the streaming engine validate everything here
before reading a tensor; :mod:`mckit.merging` holds the maths.
"""

from __future__ import annotations

import math

# Keyword options a caller may pass to each method of mckit.merging.METHODS
# (arguments the engine fills in itself, seed / thresholds / losses, excluded).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "average": (),
    "task_arithmetic": ("lam",),
    "ties": ("keep", "lam", "by", "weights"),
    "dare_ta": ("drop", "lam"),
    "dare_ties": ("drop", "keep", "lam", "by", "weights"),
    "tsv": ("lam",),
    "iso_c": ("lam",),
    "wudi": ("lam", "lr", "steps"),
    "optmerge": ("lam", "lr", "steps", "rank_ratio"),
    "optmerge_lora": ("lam", "lr", "steps", "rank_ratio"),
}


def check_method(name: str) -> str:
    """Return ``name`` if it is a method; otherwise raise ``ValueError`` listing the valid ones."""
    if name not in METHOD_OPTIONS:
        raise ValueError(f"unknown merge method {name!r}; valid: {', '.join(METHOD_OPTIONS)}")
    return name


def check_fraction(name: str, value: float, *, closed_low: bool = False, closed_high: bool = True) -> float:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval.

    Default interval: ``(0, 1]`` (used for ``keep``); DARE's ``drop`` uses
    ``[0, 1)`` because the rescale ``1 / (1 - drop)`` is undefined at 1.
    """
    value = float(value)
    low_ok = value >= 0 if closed_low else value > 0
    high_ok = value <= 1 if closed_high else value < 1
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_options(method: str, options: dict) -> None:
    """Raise ``ValueError`` for an unknown method, an option it does not take, or a fraction out of range."""
    accepted = METHOD_OPTIONS[check_method(method)]
    unknown = set(options) - set(accepted)
    if unknown:
        raise ValueError(f"option(s) {', '.join(sorted(unknown))} do not apply to method {method}; "
                         f"it accepts: {', '.join(sorted(accepted)) or 'none'}")
    if "keep" in options:
        check_fraction("keep", options["keep"])
    if "drop" in options:
        check_fraction("drop", options["drop"], closed_low=True, closed_high=False)
    if options.get("rank_ratio") is not None:
        check_fraction("rank_ratio", options["rank_ratio"])
