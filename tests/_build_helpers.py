"""Helpers for the builds' resume tests: an interruption at the n-th call, and a byte-for-byte weight check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def interrupted_at(real: Callable, n: int, calls: list) -> Callable:
    """``real`` that records each call in ``calls`` and raises KeyboardInterrupt on the ``n``-th one."""
    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return call


def counted(real: Callable, calls: list) -> Callable:
    """``real`` that records each call in ``calls``."""
    return lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs)


def same_weights(a: Path, b: Path) -> list[Path]:
    """Assert both folders hold the same files and byte-identical ``*.safetensors``; return those weights' paths.

    Other files may differ: they name their own folder (PEFT's adapter card) or record wall times.
    """
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    weights = [rel for rel in files if rel.suffix == ".safetensors"]
    for rel in weights:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    return weights
