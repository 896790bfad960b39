"""Streaming merge engine over safetensors checkpoints.

A checkpoint is a directory with ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (plus ``config.json``).  The engine merges
one tensor name at a time across the base and every expert
(:mod:`mckit.tensorfiles`) and writes the result straight into its place in
the output shard, so peak memory stays near one tensor per input plus the
merge's temporaries, never whole models.

* Tensors whose names match ``include`` (default: the LLM's 2-D linear
  weights, :data:`DEFAULT_INCLUDE`) are merged; all others are copied from
  the base.  Merging runs in float32; each output tensor keeps the base's dtype.
* Average and task arithmetic never import torch.  Each tensor is cut into
  blocks of :data:`BLOCK` entries; worker threads read a block of every input
  with ``os.preadv`` into small reused buffers (they stay in the CPU cache),
  combine them with numpy (:func:`linear_block`) and ``os.pwrite`` the block
  into the output: a few MiB per thread, and about the time it takes to read
  the inputs once.
* Every other method memory-maps the tensor of each input and runs the torch
  function of :mod:`mckit.merging` on it (torch is imported on first use).
* TIES with ``scope="global"`` streams too: for each expert, two passes over
  its task vector find the exact global magnitude threshold (a 2^15 + 2^16 bin
  bit-pattern histogram, :func:`mckit.merging.streamed_magnitude_threshold`;
  identical to ``kthvalue`` on the concatenated task vector), then a third pass merges.
* DARE masks are seeded per tensor: ``tensor_seed(seed, name)`` (+ expert index).
* The output (shards, index json, config/tokenizer/generation files copied
  from the base) is written into a temporary directory next to ``out`` and
  renamed into place at the end: a failed or interrupted merge leaves nothing
  at ``out``.  All input checks (paths, names, shapes, vocab sizes, options)
  run before anything is written; NaN/Inf are detected while streaming.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NoReturn

import numpy as np
from mckit.atomic import atomic_dir
from mckit.merge_options import check_options
from mckit.tensorfiles import (DTYPES, FLOAT_CODES, INDEX_FILE, SINGLE_FILE, BlockReader, Checkpoint,
                               ShardWriter, TensorFileError, plan_shards)

DEFAULT_INCLUDE = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 2 * 1024**3
GLOBAL_SCOPE_METHODS = ("ties", "dare_ties")
LINEAR_METHODS = ("average", "task_arithmetic")
BLOCK = 1 << 18          # entries per block of the linear kernel (1 MiB of float32: stays in L2)

__all__ = ["DEFAULT_INCLUDE", "INDEX_FILE", "SINGLE_FILE", "MergeError", "merge_checkpoints",
           "merge_state_dict", "merge_tensor", "linear_merge", "tensor_seed"]


class MergeError(ValueError):
    """Bad merge input (paths, tensor names, shapes, values or options)."""


class NonFiniteResult(ValueError):
    """A merged tensor holds a NaN or an Inf."""


# ------------------------------------------------------------ float32 views
def as_float32(array: np.ndarray) -> np.ndarray:
    """``array`` itself if float32, else a float32 copy (exact for bf16/f16)."""
    return array if array.dtype == np.float32 else array.astype(np.float32)


def all_finite(array: np.ndarray) -> bool:
    """True if no entry is NaN or +-Inf (checked block by block: small boolean temporaries, in cache)."""
    if array.dtype.kind != "f" and array.dtype != DTYPES["BF16"]:
        return True
    flat = array.reshape(-1)
    return all(np.isfinite(flat[s:s + BLOCK]).all() for s in range(0, flat.size, BLOCK))


# ------------------------------------------------------- linear kernel
WORKERS = max(1, min(4, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """Worker threads for the linear kernel (numpy and file I/O release the GIL)."""
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="merge")


def linear_block(method: str, theta_0: np.ndarray | None, thetas: Sequence[np.ndarray], lam: float,
                 out: np.ndarray) -> bool:
    """One block of average or task arithmetic, in float32, into ``out``; returns whether it is all finite.

    average:          out = sum_i theta_i / n                     (``theta_0`` unused, may be None)
    task arithmetic:  out = theta_0 + lam * sum_i tau_i,  sum_i tau_i = sum_i theta_i - n theta_0

    ``theta_0``, ``thetas``, ``out``: float32 arrays of one shape.  Same
    formulas as :func:`mckit.merging.average` / :func:`mckit.merging.task_arithmetic`.
    """
    n = np.float32(len(thetas))
    np.copyto(out, thetas[0])
    for theta in thetas[1:]:
        np.add(out, theta, out=out)
    if method == "average":
        np.divide(out, n, out=out)
    else:
        np.subtract(out, np.multiply(theta_0, n), out=out)
        np.multiply(out, np.float32(lam), out=out)
        np.add(out, theta_0, out=out)
    return all_finite(out)


def _parallel_blocks(run, size: int) -> bool:
    """``run(starts)`` over the block starts of a ``size``-entry tensor, split over the worker threads.

    Returns True if every call returned True.  Waits for every thread before
    returning or raising, so no block is still being written afterwards.
    """
    starts = range(0, size, BLOCK)
    parts = [starts[i::WORKERS] for i in range(min(WORKERS, len(starts)))]
    if len(parts) <= 1:
        return run(starts)
    jobs = [_pool().submit(run, part) for part in parts[1:]]
    try:
        first = run(parts[0])
    finally:
        wait(jobs)
    return all([job.result() for job in jobs]) and first


def linear_merge(method: str, base: np.ndarray, experts: Sequence[np.ndarray], lam: float = 1.0,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Average or task arithmetic of one in-memory tensor (:func:`linear_block`, block by block, threaded).

    ``base``/``experts``: arrays of one shape, any float dtype.  ``out``:
    optional float32 buffer with at least ``base.size`` entries.  Returns
    (result of ``base``'s shape, float32, a view of ``out`` if given; whether it is all finite).
    """
    size = base.size
    out = np.empty(size, np.float32) if out is None else out.reshape(-1)[:size]
    flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in experts]

    def run(starts) -> bool:
        finite = True
        for s in starts:
            e = min(s + BLOCK, size)
            theta_0 = None if method == "average" else as_float32(flat_base[s:e])
            finite = linear_block(method, theta_0, [as_float32(x[s:e]) for x in flat], lam, out[s:e]) and finite
        return finite

    return out.reshape(base.shape), _parallel_blocks(run, size)


_local = threading.local()


def _scratch(slot: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's reusable buffers for input ``slot``: BLOCK entries of raw bytes (any dtype) and of float32."""
    buffers = _local.__dict__.setdefault("buffers", {})
    if slot not in buffers:
        buffers[slot] = (np.empty(BLOCK * 8, np.uint8), np.empty(BLOCK, np.float32))
    return buffers[slot]


def _read_float32(reader: BlockReader, info, start: int, count: int, slot: int) -> np.ndarray:
    """Entries ``start .. start + count`` of a tensor as float32, read into this thread's buffers."""
    raw, f32 = _scratch(slot)
    if info.code == "F32":
        return reader.read(info, start, f32[:count])
    typed = raw[: count * np.dtype(DTYPES[info.code]).itemsize].view(DTYPES[info.code])
    np.copyto(f32[:count], reader.read(info, start, typed), casting="unsafe")
    return f32[:count]


# ------------------------------------------------------------- per tensor
def tensor_seed(seed: int, name: str) -> int:
    """Seed of a tensor's DARE masks: stable across runs and processes (CRC32 of the name)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def merge_tensor(method: str, name: str, base: np.ndarray, experts: list[np.ndarray], options: dict,
                 seed: int = 0, thresholds: Sequence[float] | None = None) -> np.ndarray:
    """Merge one in-memory tensor with ``method``; returns float32.

    Raises ``ValueError`` if an input holds a NaN/Inf (not checked by the
    linear methods), :class:`NonFiniteResult` if the result does.  DARE
    seeds come from :func:`tensor_seed`.
    """
    if method in LINEAR_METHODS:
        result, finite = linear_merge(method, base, experts, float(options.get("lam", 1.0)))
        if not finite:
            raise NonFiniteResult(f"merging tensor {name} produced NaN or Inf")
        return result
    import torch

    from mckit import merging as M

    kwargs = dict(options)
    if method in ("dare_ta", "dare_ties"):
        kwargs["seed"] = tensor_seed(seed, name)
    if thresholds is not None:
        kwargs["thresholds"] = thresholds
    tensors = [torch.from_numpy(as_float32(a)) for a in (base, *experts)]
    result = M.get_method(method)(tensors[0], tensors[1:], **kwargs)
    if not M.all_finite(result):
        raise NonFiniteResult(f"merging tensor {name} produced NaN or Inf")
    return result.numpy()


def _name_non_finite_input(name: str, checkpoints: list[Checkpoint]) -> None:
    """Raise ``MergeError`` naming the first input file whose tensor ``name`` holds a NaN/Inf."""
    for ck in checkpoints:
        if not all_finite(ck.array(name)):
            raise MergeError(f"tensor {name} in {ck.file_of(name)} contains NaN or Inf")


# ------------------------------------------------------------- validation
def _validate_options(method: str, options: dict, scope: str) -> None:
    try:
        check_options(method, options)
    except ValueError as err:
        raise MergeError(str(err)) from None
    if scope not in ("tensor", "global"):
        raise MergeError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if scope == "global" and method not in GLOBAL_SCOPE_METHODS:
        raise MergeError(f"scope='global' applies to {', '.join(GLOBAL_SCOPE_METHODS)}, not {method}")


def _validate_inputs(base: Checkpoint, experts: list[Checkpoint], merged: list[str],
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


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MergeError(f"output directory {out} exists (pass overwrite=True to replace it)")
    if not out.parent.is_dir():
        raise MergeError(f"parent directory of the output does not exist: {out.parent}")


def _open(path: str | Path) -> Checkpoint:
    try:
        return Checkpoint(path)
    except TensorFileError as err:
        raise MergeError(str(err)) from None


# ------------------------------------------------------------- global TIES
def _global_thresholds(method: str, base: Checkpoint, experts: list[Checkpoint], merged: list[str],
                       options: dict, seed: int) -> list[float]:
    """Per-expert exact global magnitude threshold over all merged tensors (two streamed passes)."""
    import torch

    from mckit import merging as M

    keep = float(options.get("keep", 0.2 if method == "ties" else 1.0))
    drop = float(options.get("drop", 0.2))

    def stream(i: int):
        for name in merged:
            tau = torch.from_numpy(as_float32(experts[i].array(name))) - torch.from_numpy(as_float32(base.array(name)))
            if method == "dare_ties":
                generator = torch.Generator().manual_seed(tensor_seed(seed, name) + i)
                tau = M.dare_drop(tau, drop, generator)
            yield tau

    return [M.streamed_magnitude_threshold(lambda i=i: stream(i), keep) for i in range(len(experts))]


# --------------------------------------------------------------- the merge
def merge_checkpoints(method: str, base: str | Path, experts: Sequence[str | Path], out: str | Path, *,
                      include: str = DEFAULT_INCLUDE, scope: str = "tensor", seed: int = 0,
                      overwrite: bool = False, allow_vocab_mismatch: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                      **options) -> Path:
    """Merge safetensors checkpoints tensor by tensor and write the result to ``out``.

    ``method``: a name of :data:`mckit.merging.METHODS`; ``options``: its keyword
    arguments (``lam``, ``keep``, ``drop``, ``by``, ``rank_ratio``, ``lr``, ``steps`` ...).
    ``include``: regex (``re.fullmatch``) on tensor names selecting what is merged;
    ``".*"`` merges everything.  ``scope``: "tensor" or "global" top-k for TIES.
    Returns ``out``.  Raises :class:`MergeError` (a ``ValueError``) on bad input.
    """
    _validate_options(method, options, scope)
    out = Path(out)
    _prepare_out(out, overwrite)
    if not experts:
        raise MergeError("no expert checkpoints given")
    pattern = re.compile(include)
    base_ck = _open(base)
    expert_cks = [_open(e) for e in experts]
    merged = [n for n in base_ck.names if pattern.fullmatch(n)]
    _validate_inputs(base_ck, expert_cks, merged, allow_vocab_mismatch)
    thresholds = (_global_thresholds(method, base_ck, expert_cks, merged, options, seed)
                  if scope == "global" else None)
    run = _MergeRun(method, base_ck, expert_cks, set(merged), options, seed, thresholds)
    with atomic_dir(out, overwrite=True) as tmp:
        _write_merge(run, tmp, max_shard_bytes, progress)
        _copy_side_files(base_ck.path, tmp)
    return out


def _write_merge(run: "_MergeRun", tmp: Path, max_shard_bytes: int, progress: bool) -> None:
    """Write every tensor of the base, merged or copied, into shards (+ index) under ``tmp``."""
    base = run.base
    entries = [(n, base.shape(n), base.dtype_code(n)) for n in base.names]
    shards = plan_shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = _progress_bar(len(entries), run.method, progress)
    weight_map = {}
    with BlockReader(run.input_files()) as run.reader:
        for file_name, shard in zip(names, shards):
            writer = ShardWriter(tmp / file_name, shard)
            try:
                for name, _, code in shard:
                    run.write_tensor(writer, name, code)
                    weight_map[name] = file_name
                    if bar is not None:
                        bar.update()
            finally:
                writer.close(check=False)
            writer.close()
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        total = sum(base.info(n).nbytes for n in base.names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _progress_bar(total: int, method: str, progress: bool):
    """A tqdm bar over tensors, or None (tqdm is imported only when shown: it costs 50 ms of start-up)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"merge {method}", unit="tensor")


@dataclass
class _MergeRun:
    """One merge in progress: its inputs and settings, and how each output tensor is made."""

    method: str
    base: Checkpoint
    experts: list[Checkpoint]
    merged: set[str]
    options: dict
    seed: int
    thresholds: list[float] | None
    reader: BlockReader | None = None

    def linear_inputs(self) -> list[Checkpoint]:
        """Checkpoints the linear kernel reads: the average never reads the base."""
        return self.experts if self.method == "average" else [self.base, *self.experts]

    def input_files(self) -> list[Path]:
        """Files the linear kernel reads (none for the other methods)."""
        if self.method not in LINEAR_METHODS:
            return []
        return [ck.file_of(n) for ck in self.linear_inputs() for n in self.merged]

    def write_tensor(self, writer: ShardWriter, name: str, code: str) -> None:
        """Merge tensor ``name`` (or copy the base's after a NaN/Inf check) into ``writer``."""
        if name not in self.merged:
            array = self.base.array(name)
            if code in FLOAT_CODES and not all_finite(array):
                raise MergeError(f"tensor {name} in {self.base.file_of(name)} contains NaN or Inf")
            writer.write(name, array)
        elif self.method in LINEAR_METHODS:
            size = self.base.info(name).numel
            if not _parallel_blocks(lambda starts: self._linear_blocks(writer, name, starts), size):
                self._fail(name, NonFiniteResult(f"merging tensor {name} produced NaN or Inf"))
        else:
            writer.write(name, self._torch_merge(name))

    def _linear_blocks(self, writer: ShardWriter, name: str, starts) -> bool:
        """Read, merge and write the blocks ``starts`` of tensor ``name``; returns whether all are finite."""
        inputs = self.linear_inputs()
        size, code = self.base.info(name).numel, writer.slots[name].code
        lam, finite = float(self.options.get("lam", 1.0)), True
        for start in starts:
            count = min(BLOCK, size - start)
            arrays = [_read_float32(self.reader, ck.info(name), start, count, i) for i, ck in enumerate(inputs)]
            theta_0, thetas = (None, arrays) if self.method == "average" else (arrays[0], arrays[1:])
            out = _scratch(len(inputs))[1][:count]
            finite = linear_block(self.method, theta_0, thetas, lam, out) and finite
            writer.write_entries(name, start, out if code == "F32" else out.astype(DTYPES[code]))
        return finite

    def _torch_merge(self, name: str) -> np.ndarray:
        theta_0 = self.base.array(name)
        try:
            result = merge_tensor(self.method, name, theta_0, [e.array(name) for e in self.experts],
                                  self.options, self.seed, self.thresholds)
        except ValueError as err:
            self._fail(name, err)
        return result.astype(theta_0.dtype, copy=False)

    def _fail(self, name: str, err: ValueError) -> NoReturn:
        """Raise ``MergeError`` naming the input file with a NaN/Inf in ``name``, else re-raise ``err``."""
        _name_non_finite_input(name, [self.base, *self.experts])
        if isinstance(err, NonFiniteResult):
            raise MergeError(f"{err} (inputs are finite)") from None
        raise err


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------- in memory
def merge_state_dict(method: str, base: dict, experts: Sequence[dict], *, include: str = DEFAULT_INCLUDE,
                     scope: str = "tensor", seed: int = 0, **options) -> dict:
    """In-memory counterpart of :func:`merge_checkpoints` for small models (same per-tensor maths).

    ``base``/``experts``: name -> torch tensor.  Returns a new state dict:
    tensors matching ``include`` merged (in the base's dtype), all others
    the base's tensors.  Inputs are not modified.
    """
    import torch

    from mckit import merging as M

    _validate_options(method, options, scope)
    pattern = re.compile(include)
    merged = [n for n in base if pattern.fullmatch(n)]
    for name in merged:
        for i, e in enumerate(experts):
            if name not in e:
                raise MergeError(f"tensor {name} is missing in expert {i}")
            if e[name].shape != base[name].shape:
                raise MergeError(f"tensor {name} has shape {tuple(e[name].shape)} in expert {i} "
                                 f"but {tuple(base[name].shape)} in the base")
    thresholds = None
    if scope == "global":
        keep = float(options.get("keep", 0.2 if method == "ties" else 1.0))
        if method == "dare_ties":
            drop = float(options.get("drop", 0.2))
            dropped = [{n: M.dare_drop(e[n].float() - base[n].float(), drop,
                                       torch.Generator().manual_seed(tensor_seed(seed, n) + i))
                        for n in merged} for i, e in enumerate(experts)]
            zero = {n: torch.zeros_like(base[n], dtype=torch.float32) for n in merged}
            thresholds = M.global_magnitude_thresholds(zero, dropped, keep, merged)
        else:
            thresholds = M.global_magnitude_thresholds(base, experts, keep, merged)
    result = {}
    for name, theta_0 in base.items():
        if name in merged:
            labels = ["base"] + [f"expert {i}" for i in range(len(experts))]
            tensors = [theta_0] + [e[name] for e in experts]
            for t, label in zip(tensors, labels):
                M.check_finite(t, f"{name} in {label}")
            arrays = [t.detach().float().numpy() for t in tensors]
            merged_array = merge_tensor(method, name, arrays[0], arrays[1:], options, seed, thresholds)
            result[name] = torch.from_numpy(merged_array).to(theta_0.dtype)
        else:
            result[name] = theta_0.clone()
    return result
