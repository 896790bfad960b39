"""TIES as a block kernel in numpy (no torch): the engine's streamed TIES, no whole-tensor temporaries.

Per merged tensor, from the task vectors tau_i = theta_i - theta_0 of n experts:

1. threshold t_i = the k-th largest |tau_i| of the tensor, k = int(keep * numel) (:func:`bracket` +
   :func:`threshold_in_bracket`), unless whole-model (global) thresholds are given;
2. per block of entries (:func:`ties_block`): trimmed_i = tau_i [|tau_i| >= t_i],
   gamma = sign(sum_i w_i trimmed_i) (+1 where the sum is 0),
   merged = gamma sum_i w_i |trimmed_i| agree_i / D with agree_i = [trimmed_i gamma > 0],
   D = sum_i agree_i (``by="count"``) or sum_i w_i agree_i (``"weight"``), D := 1 where none agrees;
   theta = theta_0 + lam merged.

The same arithmetic, in the same order and in float32, as :func:`mckit.merge.kernels.ties_inplace`:
tests check the streamed merge against the in-memory one.

How t_i is found without holding |tau_i|: a sample of :data:`SAMPLE_CHUNKS` chunks spread over the
tensor gives a bracket [lo, hi] around the (1 - keep) quantile, wide enough (:data:`SIGMAS` binomial
standard deviations of the sample's rank) that the true k-th value falls inside it but for freak
layouts; one streamed pass counts the entries above ``hi`` and keeps the few inside the bracket, and
the k-th largest is picked among those exactly. If the count shows the bracket missed, the threshold
is computed from the whole |tau_i| (one tensor in memory): exact either way.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np

from mckit.merge.linear_kernel import BLOCK, all_finite, as_float32, map_blocks, read_float32, scratch
from mckit.storage.tensorfiles import DTYPES, BlockReader

#: Chunks of :data:`CHUNK` contiguous entries read to place the bracket (one preadv-sized read each).
SAMPLE_CHUNKS = 256
CHUNK = 1024
#: Half-width of the bracket in binomial standard deviations of the sampled rank (plus a few ranks).
SIGMAS = 8.0


def kth_largest(magnitudes: np.ndarray, k: int) -> float:
    """The k-th largest entry of a flat non-negative float32 array (inf for k == 0, 0.0 for k == numel)."""
    if k <= 0:
        return math.inf
    if k >= magnitudes.size:
        return 0.0
    return float(np.partition(magnitudes, magnitudes.size - k)[magnitudes.size - k])


def bracket(sample: np.ndarray, keep: float) -> tuple[float, float]:
    """[lo, hi] around the (1 - keep) quantile of the population ``sample`` is drawn from.

    With n sampled magnitudes the quantile's rank in the sample is r = (1 - keep) n, give or take
    sqrt(n keep (1 - keep)); the bracket spans :data:`SIGMAS` of those either side (-inf / inf at the ends).
    """
    n = sample.size
    ordered = np.sort(sample)
    rank = (1.0 - keep) * n
    spread = SIGMAS * math.sqrt(n * keep * (1.0 - keep)) + 4
    lo_i, hi_i = math.floor(rank - spread), math.ceil(rank + spread)
    lo = -math.inf if lo_i < 0 else float(ordered[lo_i])
    hi = math.inf if hi_i >= n else float(ordered[hi_i])
    return lo, hi


def count_block(magnitudes: np.ndarray, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """(entries above ``hi``, the entries inside [lo, hi]) of one block of |tau_i|."""
    inside = magnitudes >= lo
    inside &= magnitudes <= hi
    return int(np.count_nonzero(magnitudes > hi)), magnitudes[inside]


def threshold_in_bracket(k: int, above: int, inside: Sequence[np.ndarray]) -> float | None:
    """The k-th largest |tau_i| from ``above`` (entries > hi) and the entries inside the bracket, or
    None when it lies outside the bracket (the caller then computes it from the whole tensor)."""
    if k <= 0:
        return math.inf
    values = np.concatenate(inside) if inside else np.empty(0, np.float32)
    rank = k - above                                   # rank of the k-th largest among the bracket's entries
    if rank <= 0 or rank > values.size:
        return None
    return float(np.partition(values, values.size - rank)[values.size - rank])


class TiesWork:
    """One thread's buffers for :func:`ties_block`: n trimmed task vectors and four float32 temporaries."""

    def __init__(self, n: int, size: int):
        self.trimmed = [np.empty(size, np.float32) for _ in range(n)]
        self.tmp, self.total, self.numerator, self.denominator = (np.empty(size, np.float32) for _ in range(4))
        self.flag = np.empty(size, bool)

    def view(self, count: int) -> "TiesWork":
        """The same buffers cut to ``count`` entries (the last block of a tensor is shorter)."""
        out = object.__new__(TiesWork)
        out.trimmed = [t[:count] for t in self.trimmed]
        out.tmp, out.total, out.numerator, out.denominator, out.flag = (
            a[:count] for a in (self.tmp, self.total, self.numerator, self.denominator, self.flag))
        return out


def ties_block(theta_0: np.ndarray, thetas: Sequence[np.ndarray], thresholds: Sequence[float],
               weights: Sequence[float], by: str, lam: float, out: np.ndarray, work: TiesWork) -> None:
    """One block of TIES into ``out``: theta_0 + lam * merged (module docstring); float32 arrays of one length."""
    tmp, flag = work.tmp, work.flag
    for theta, threshold, trimmed in zip(thetas, thresholds, work.trimmed):
        np.subtract(theta, theta_0, out=trimmed)
        np.abs(trimmed, out=tmp)
        np.greater_equal(tmp, np.float32(threshold), out=flag)
        np.multiply(trimmed, flag, out=trimmed)
    gamma = work.total
    np.multiply(work.trimmed[0], np.float32(weights[0]), out=gamma)
    for w, trimmed in zip(weights[1:], work.trimmed[1:]):
        np.multiply(trimmed, np.float32(w), out=tmp)
        np.add(gamma, tmp, out=gamma)
    np.greater_equal(gamma, np.float32(0), out=flag)
    np.multiply(flag, np.float32(2), out=gamma)
    np.subtract(gamma, np.float32(1), out=gamma)          # +1 where the weighted sum >= 0, else -1
    numerator, denominator = work.numerator, work.denominator
    numerator.fill(0)
    denominator.fill(0)
    for w, trimmed in zip(weights, work.trimmed):
        np.multiply(trimmed, gamma, out=tmp)
        np.maximum(tmp, np.float32(0), out=tmp)              # |trimmed_i| where it agrees with gamma
        if w != 1.0:
            np.multiply(tmp, np.float32(w), out=trimmed)
            np.add(numerator, trimmed, out=numerator)
        else:
            np.add(numerator, tmp, out=numerator)
        np.greater(tmp, np.float32(0), out=flag)
        if by == "count" or w == 1.0:
            np.add(denominator, flag, out=denominator)
        else:
            np.multiply(flag, np.float32(w), out=tmp)
            np.add(denominator, tmp, out=denominator)
    np.equal(denominator, np.float32(0), out=flag)
    np.add(denominator, flag, out=denominator)             # D := 1 where no expert agrees
    np.multiply(numerator, gamma, out=numerator)
    np.divide(numerator, denominator, out=numerator)
    np.multiply(numerator, np.float32(lam), out=numerator)
    np.add(numerator, theta_0, out=out)


# ------------------------------------------------------------- streamed over a tensor's blocks
_local = threading.local()


def _work(n: int) -> TiesWork:
    """This thread's :class:`TiesWork` for ``n`` experts, made once and reused."""
    cache = _local.__dict__.setdefault("work", {})
    if n not in cache:
        cache[n] = TiesWork(n, BLOCK)
    return cache[n]


def _sample(base, experts, name: str) -> list[np.ndarray]:
    """|tau_i| at :data:`SAMPLE_CHUNKS` chunks of :data:`CHUNK` entries spread evenly over tensor ``name``."""
    numel = base.info(name).numel
    starts = np.linspace(0, numel - CHUNK, SAMPLE_CHUNKS).astype(np.int64)
    index = (starts[:, None] + np.arange(CHUNK)).reshape(-1)
    theta_0 = as_float32(base.array(name).reshape(-1)[index])
    return [np.abs(as_float32(e.array(name).reshape(-1)[index]) - theta_0) for e in experts]


def _whole(base, experts, name: str, i: int, k: int) -> float:
    """t_i from the whole |tau_i| of tensor ``name`` (one float32 copy in memory)."""
    tau = as_float32(experts[i].array(name).reshape(-1)) - as_float32(base.array(name).reshape(-1))
    return kth_largest(np.abs(tau, out=tau), k)


def tensor_thresholds(reader: BlockReader, base, experts: Sequence, name: str, keep: float) -> list[float]:
    """Each expert's trim threshold t_i over tensor ``name``: the k-th largest |tau_i|, k = int(keep * numel).

    ``base``/``experts``: checkpoints (or renamed views) whose files ``reader`` has open. Small tensors are
    done whole; larger ones with a bracket from a sample and one streamed counting pass (module docstring).
    """
    numel = base.info(name).numel
    k = int(keep * numel)
    if numel <= 4 * SAMPLE_CHUNKS * CHUNK:
        return [_whole(base, experts, name, i, k) for i in range(len(experts))]
    brackets = [bracket(s, keep) for s in _sample(base, experts, name)]
    infos = [ck.info(name) for ck in (base, *experts)]

    def count(starts) -> list[tuple[int, list[np.ndarray]]]:
        found = [(0, []) for _ in experts]
        for start in starts:
            size = min(BLOCK, numel - start)
            theta_0 = read_float32(reader, infos[0], start, size, 0)
            for i, info in enumerate(infos[1:]):
                tmp = _work(len(experts)).tmp[:size]
                np.subtract(read_float32(reader, info, start, size, 1 + i), theta_0, out=tmp)
                above, inside = count_block(np.abs(tmp, out=tmp), *brackets[i])
                found[i] = (found[i][0] + above, found[i][1] + [inside])
        return found

    parts = map_blocks(count, numel)
    out = []
    for i in range(len(experts)):
        threshold = threshold_in_bracket(k, sum(p[i][0] for p in parts), [a for p in parts for a in p[i][1]])
        out.append(_whole(base, experts, name, i, k) if threshold is None else threshold)
    return out


def ties_blocks(reader: BlockReader, base, experts: Sequence, name: str, starts, thresholds: Sequence[float],
                options: dict, write) -> bool:
    """TIES over the blocks ``starts`` of tensor ``name``: each merged block goes to ``write(start, values)``
    in the base's dtype; returns whether every result is finite."""
    infos = [ck.info(name) for ck in (base, *experts)]
    numel, code = infos[0].numel, infos[0].code
    weights = options.get("weights") or [1.0] * len(experts)
    work, out, finite = _work(len(experts)), scratch(len(infos))[1], True
    for start in starts:
        size = min(BLOCK, numel - start)
        arrays = [read_float32(reader, info, start, size, i) for i, info in enumerate(infos)]
        ties_block(arrays[0], arrays[1:], thresholds, weights, options["by"], float(options["lam"]),
                   out[:size], work.view(size))
        finite = all_finite(out[:size]) and finite
        write(start, out[:size] if code == "F32" else out[:size].astype(DTYPES[code]))
    return finite
