"""Checks of a merge request before anything is written: the output, the inputs, the tensor filter."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

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
