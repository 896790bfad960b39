"""Checks of a merge request before anything is written: the output, the inputs, the tensor filter."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mckit.storage.atomic import check_replaceable
from mckit.storage.tensorfiles import Checkpoint, TensorFileError


class MergeError(ValueError):
    """Bad merge input (paths, tensor names, shapes, values or options)."""


def validate_inputs(base: Checkpoint, experts: list[Checkpoint], merged: list[str],
                     allow_vocab_mismatch: bool) -> None:
    if not allow_vocab_mismatch:
        vocab = base.config().get("vocab_size")
        for e in experts:
            other = e.config().get("vocab_size")
            if vocab is not None and other is not None and other != vocab:
                raise MergeError(f"different vocab sizes: base {base.path} has {vocab}, expert {e.path} "
                                 f"has {other} (align the vocabularies first, or pass "
                                 f"allow_vocab_mismatch=True to take unmerged tensors from the base)")
    for name in merged:
        for e in experts:
            if name not in e:
                raise MergeError(f"tensor {name} is missing in expert {e.path}")
            if e.shape(name) != base.shape(name):
                raise MergeError(f"tensor {name} has shape {e.shape(name)} in {e.file_of(name)} "
                                 f"but {base.shape(name)} in {base.file_of(name)}")


def prepare_out(out: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse an output that is, contains or lies inside an input, or that ``overwrite`` may not replace."""
    target = out.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise MergeError(f"output {out} is, contains or lies inside the input {path}: writing it would destroy "
                             "the input; choose another output")
    try:
        check_replaceable(out, overwrite)
    except FileExistsError as err:
        raise MergeError(str(err)) from None
    if not out.parent.is_dir():
        raise MergeError(f"parent directory of the output does not exist: {out.parent}")


def check_distinct(base: Path, experts: Sequence[Path]) -> None:
    """Refuse the base given as an expert, or one expert given twice (a silent no-op or double weight)."""
    seen: dict[Path, str] = {Path(base).resolve(): "the base"}
    for path in experts:
        key = Path(path).resolve()
        if key in seen:
            raise MergeError(f"expert {path} is the same checkpoint as {seen[key]}; give each checkpoint once")
        seen[key] = f"expert {path}"


def merged_names(names: Sequence[str], include: str) -> list[str]:
    """The tensor names ``include`` selects; an invalid pattern or one matching nothing is an error."""
    try:
        pattern = re.compile(include)
    except re.error as err:
        raise MergeError(f"--include {include!r} is not a valid regular expression: {err}") from None
    merged = [n for n in names if pattern.fullmatch(n)]
    if not merged:
        raise MergeError(f"--include {include!r} matches no tensor of the base: nothing would be merged")
    return merged


def open_checkpoint(path: str | Path) -> Checkpoint:
    try:
        return Checkpoint(path)
    except TensorFileError as err:
        raise MergeError(str(err)) from None


#: Largest relative distance ||theta_i - theta_0|| / ||theta_0|| of a fine-tune from its base that the checks
#: accept: fine-tunes move their weights by a few percent, two separately pre-trained models of one shape by
#: about sqrt(2) (independent weights of equal norm).
FINE_TUNE_LIMIT = 0.5


def relative_distance(base, expert, name: str, size: int = 1 << 20) -> float:
    """||theta_i - theta_0|| / ||theta_0|| of tensor ``name`` over an evenly strided sample of about ``size``
    entries (float64), read through memory maps."""
    flat_0, flat_i = base.array(name).reshape(-1), expert.array(name).reshape(-1)
    step = max(1, flat_0.size // size)
    theta_0 = flat_0[::step].astype(np.float64)
    norm = float(np.linalg.norm(theta_0))
    return float(np.linalg.norm(flat_i[::step].astype(np.float64) - theta_0)) / norm if norm else 0.0


def check_fine_tunes(base, experts: Sequence, merged: Sequence[str], labels: Sequence[str],
                     limit: float = FINE_TUNE_LIMIT) -> None:
    """Each expert must be a fine-tune of the base: on the first and the last merged tensor its relative distance
    (:func:`relative_distance`) stays under ``limit``; otherwise a ``MergeError`` names the expert, the tensor
    and the distance (same shapes do not make the same base: Qwen2-7B and Qwen2.5-7B share every shape)."""
    for expert, label in zip(experts, labels):
        for name in dict.fromkeys((merged[0], merged[-1])):
            distance = relative_distance(base, expert, name)
            if not distance < limit:
                raise MergeError(f"{label} is not a fine-tune of the base: its {name} lies at a relative distance "
                                 f"of {distance:.2f} from the base's (fine-tunes stay under {limit}); compose "
                                 "sources built on this very base")
