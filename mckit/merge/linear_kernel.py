"""Average and task arithmetic as a block kernel in numpy (no torch): the engine's fast path.

Each tensor is cut into blocks of :data:`BLOCK` entries; worker threads read a
block of every input with ``os.preadv`` into small reused buffers (they stay in
the CPU cache), combine them in float32 (:func:`linear_block`) and hand the
block back to be written in place: a few MiB per thread, and about the time
it takes to read the inputs once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

import numpy as np

from mckit.storage.tensorfiles import DTYPES, BlockReader

BLOCK = 1 << 18          # entries per block of the linear kernel (1 MiB of float32: stays in L2)
WORKERS = max(1, min(4, os.cpu_count() or 1))




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
    formulas as :func:`mckit.merge.methods.average` / :func:`mckit.merge.methods.task_arithmetic`.
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


def map_blocks(run, size: int) -> list:
    """``[run(starts) for each worker's share]`` of the block starts of a ``size``-entry tensor, side by side.

    Waits for every thread before returning or raising, so no block is still
    being read or written afterwards.
    """
    starts = range(0, size, BLOCK)
    parts = [starts[i::WORKERS] for i in range(min(WORKERS, len(starts)))]
    if len(parts) <= 1:
        return [run(starts)]
    jobs = [_pool().submit(run, part) for part in parts[1:]]
    try:
        first = run(parts[0])
    finally:
        wait(jobs)
    return [first] + [job.result() for job in jobs]


def parallel_blocks(run, size: int) -> bool:
    """:func:`map_blocks` of a ``run`` that returns whether its blocks are finite: True if all are."""
    return all(map_blocks(run, size))


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

    return out.reshape(base.shape), parallel_blocks(run, size)




_local = threading.local()


def scratch(slot: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's reusable buffers for input ``slot``: BLOCK entries of raw bytes (any dtype) and of float32."""
    buffers = _local.__dict__.setdefault("buffers", {})
    if slot not in buffers:
        buffers[slot] = (np.empty(BLOCK * 8, np.uint8), np.empty(BLOCK, np.float32))
    return buffers[slot]


def read_float32(reader: BlockReader, info, start: int, count: int, slot: int) -> np.ndarray:
    """Entries ``start .. start + count`` of a tensor as float32, read into this thread's buffers."""
    raw, f32 = scratch(slot)
    if info.code == "F32":
        return reader.read(info, start, f32[:count])
    typed = raw[: count * np.dtype(DTYPES[info.code]).itemsize].view(DTYPES[info.code])
    np.copyto(f32[:count], reader.read(info, start, typed), casting="unsafe")
    return f32[:count]
