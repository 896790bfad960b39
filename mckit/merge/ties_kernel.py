"""TIES as a block kernel (numpy and numba, no torch): the engine's streamed TIES, no whole-tensor temporaries.

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
layouts; a streamed pass counts the entries above ``hi`` and keeps the few inside the bracket, and
the k-th largest is picked among those exactly. If the count shows the bracket missed, the threshold
is computed from the whole |tau_i| (one tensor in memory): exact either way.

:func:`streamed_ties` (the engine's TIES) does the counting inside the merge itself, so it reads the
inputs once: it trims with each bracket's lower end, then merges again only the positions where some
entry fell inside its bracket (:class:`Pending`, :func:`_fix_up`). :func:`tensor_thresholds` (MMER over
checkpoints) counts in a pass of its own.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np

from mckit.merge.linear_kernel import BLOCK, all_finite, as_float32, map_blocks, read_float32, scratch
from mckit.storage.tensorfiles import DTYPES, BlockReader

#: Chunks of :data:`CHUNK` contiguous entries read (memory-mapped) to place the bracket.
SAMPLE_CHUNKS = 128
CHUNK = 1024
#: Half-width of the bracket in binomial standard deviations of the sampled rank (plus a few ranks).
SIGMAS = 4.0
#: Entries per call of :func:`ties_block` (each read block is cut into these): its float32 buffers then stay
#: in the CPU's cache (measured with numpy's passes: 17.6 ns per entry for 3 experts on one core at 2^16,
#: against 26.4 at 2^18).
SUB = 1 << 16


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

    def view(self, count: int) -> "TiesWork":
        """The same buffers cut to ``count`` entries (the last block of a tensor is shorter)."""
        out = object.__new__(TiesWork)
        out.trimmed = [t[:count] for t in self.trimmed]
        out.tmp, out.total, out.numerator, out.denominator = (
            a[:count] for a in (self.tmp, self.total, self.numerator, self.denominator))
        return out


_NO_HI = np.empty(0, np.float32)
_NO_FLAGS = np.empty(0, bool)


def ties_block(theta_0: np.ndarray, thetas: Sequence[np.ndarray], thresholds: Sequence[float],
               weights: Sequence[float], by: str, lam: float, out: np.ndarray, work: TiesWork,
               observe: "Pending | None" = None) -> None:
    """One block of TIES into ``out``: theta_0 + lam * merged (module docstring); float32 arrays of one length,
    computed by the compiled kernel :func:`mckit.merge.ties_jit.ties_fused`. ``observe``: a :class:`Pending`
    whose per-expert counts above the bracket and uncertain positions this piece adds to."""
    from mckit.merge.ties_jit import ties_fused      # numba takes 0.4 s to import: only where TIES runs

    n = len(thetas)
    hi, above, uncertain = ((observe.hi, observe.above, observe.uncertain) if observe is not None
                            else (_NO_HI, np.zeros(n, np.int64), _NO_FLAGS))
    ties_fused(theta_0, tuple(thetas), np.asarray(thresholds, np.float32), np.asarray(weights, np.float32),
               by == "count", np.float32(lam), out, tuple(work.trimmed), work.total, work.numerator,
               work.denominator, hi, above, uncertain)


# ------------------------------------------------------------- streamed over a tensor's blocks
_local = threading.local()


def _work(n: int) -> TiesWork:
    """This thread's :class:`TiesWork` for ``n`` experts (:data:`SUB` entries), made once and reused."""
    cache = _local.__dict__.setdefault("work", {})
    if n not in cache:
        cache[n] = TiesWork(n, SUB)
    return cache[n]


def sub_blocks(size: int):
    """(start, end) of the :data:`SUB`-entry pieces of a ``size``-entry block."""
    return ((s, min(s + SUB, size)) for s in range(0, size, SUB))


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
    if numel <= SAMPLE_CHUNKS * CHUNK:
        return [_whole(base, experts, name, i, k) for i in range(len(experts))]
    brackets = [bracket(s, keep) for s in _sample(base, experts, name)]
    infos = [ck.info(name) for ck in (base, *experts)]

    def count(starts) -> list[tuple[int, list[np.ndarray]]]:
        found = [[0, []] for _ in experts]
        tmp = _work(len(experts)).tmp
        for start in starts:
            size = min(BLOCK, numel - start)
            theta_0 = read_float32(reader, infos[0], start, size, 0)
            for i, info in enumerate(infos[1:]):
                theta = read_float32(reader, info, start, size, 1 + i)
                for s, e in sub_blocks(size):
                    part = tmp[:e - s]
                    np.subtract(theta[s:e], theta_0[s:e], out=part)
                    above, inside = count_block(np.abs(part, out=part), *brackets[i])
                    found[i][0] += above
                    found[i][1].append(inside)
        return found

    parts = map_blocks(count, numel)
    out = []
    for i in range(len(experts)):
        threshold = threshold_in_bracket(k, sum(p[i][0] for p in parts), [a for p in parts for a in p[i][1]])
        out.append(_whole(base, experts, name, i, k) if threshold is None else threshold)
    return out


class Pending:
    """What one worker's blocks leave for the fix-up of a one-pass TIES, merged with each expert's provisional
    threshold at its bracket's lower end: per expert the count of entries above its bracket, and the positions
    where any expert's entry lies inside its bracket, with every input there ((1 + n, m) float32: theta_0,
    then each expert), from which each expert's entries inside its bracket are read again."""

    def __init__(self, brackets):
        self.hi = np.array([hi for _, hi in brackets], np.float32)
        self.above = np.zeros(len(brackets), np.int64)
        self.index: list[np.ndarray] = []
        self.inputs: list[np.ndarray] = []
        self.uncertain = np.empty(0, bool)

    def begin(self, size: int) -> None:
        """A piece of ``size`` entries starts: :func:`ties_block` marks its uncertain positions."""
        self.uncertain = np.empty(size, bool)

    def end(self, theta_0: np.ndarray, thetas: Sequence[np.ndarray], offset: int) -> None:
        """Keep the inputs at this piece's uncertain positions (entries ``offset ..``)."""
        index = np.flatnonzero(self.uncertain)
        if index.size:
            self.index.append(index + offset)
            self.inputs.append(np.stack([theta_0[index], *(t[index] for t in thetas)]))


def ties_blocks(reader: BlockReader, base, experts: Sequence, name: str, starts, thresholds: Sequence[float],
                options: dict, writer, brackets=None, again: bool = False) -> tuple[bool, Pending | None]:
    """TIES over the blocks ``starts`` of tensor ``name``, each merged block written into ``writer`` in the base's
    dtype (``again``: over a first attempt). ``brackets`` given: also observe them (:class:`Pending`).
    Returns (whether every result is finite, the observations or None)."""
    infos = [ck.info(name) for ck in (base, *experts)]
    numel, code = infos[0].numel, infos[0].code
    weights = options.get("weights") or [1.0] * len(experts)
    work, out, finite = _work(len(experts)), scratch(len(infos))[1], True
    pending = None if brackets is None else Pending(brackets)
    for start in starts:
        size = min(BLOCK, numel - start)
        arrays = [read_float32(reader, info, start, size, i) for i, info in enumerate(infos)]
        for s, e in sub_blocks(size):
            piece = [a[s:e] for a in arrays]
            if pending is not None:
                pending.begin(e - s)
            ties_block(piece[0], piece[1:], thresholds, weights, options["by"], float(options["lam"]), out[s:e],
                       work.view(e - s), pending)
            if pending is not None:
                pending.end(piece[0], piece[1:], start + s)
        finite = all_finite(out[:size]) and finite
        writer.write_entries(name, start, out[:size] if code == "F32" else out[:size].astype(DTYPES[code]), again)
    return finite, pending


def streamed_ties(reader: BlockReader, base, experts: Sequence, name: str, options: dict, writer,
                  thresholds: Sequence[float] | None = None) -> bool:
    """TIES of tensor ``name`` into ``writer`` in one pass over the inputs; returns whether it is all finite.

    ``thresholds``: whole-model ones (global scope), else each expert's own over this tensor: exact from the
    whole |tau_i| for a tensor no larger than the sample; otherwise the pass merges with provisional
    thresholds at the brackets' lower ends while it counts (:class:`Pending`), then every position where an
    entry fell inside a bracket is merged again with the exact thresholds and rewritten. Entries outside the
    brackets are trimmed the same way by any threshold inside them. Should a bracket miss the k-th value, the
    threshold comes from the whole |tau_i| and the tensor is merged a second time.
    """
    numel, keep, n = base.info(name).numel, float(options["keep"]), len(experts)
    k = int(keep * numel)

    def run(cuts, brackets=None, again=False):
        return map_blocks(lambda starts: ties_blocks(reader, base, experts, name, starts, cuts, options, writer,
                                                     brackets, again), numel)

    if thresholds is None and numel <= SAMPLE_CHUNKS * CHUNK:
        thresholds = [_whole(base, experts, name, i, k) for i in range(n)]
    if thresholds is not None:
        return all(finite for finite, _ in run(thresholds))
    brackets = [bracket(s, keep) for s in _sample(base, experts, name)]
    parts = run([lo for lo, _ in brackets], brackets)
    pending = [p for _, p in parts]
    index = np.concatenate([np.empty(0, np.int64)] + [i for p in pending for i in p.index])
    inputs = np.concatenate([np.empty((n + 1, 0), np.float32)] + [x for p in pending for x in p.inputs], axis=1)
    exact = []
    for i, (lo, hi) in enumerate(brackets):
        magnitudes = np.abs(inputs[1 + i] - inputs[0])
        inside = magnitudes[(magnitudes >= np.float32(lo)) & (magnitudes <= np.float32(hi))]
        t = threshold_in_bracket(k, int(sum(p.above[i] for p in pending)), [inside])
        exact.append(t if t is not None and lo <= t <= hi else None)
    if None in exact:
        exact = [_whole(base, experts, name, i, k) if t is None else t for i, t in enumerate(exact)]
        return all(finite for finite, _ in run(exact, again=True))
    return _fix_up(writer, name, index, inputs, exact, options, base.info(name).code) and all(f for f, _ in parts)


def _fix_up(writer, name: str, index: np.ndarray, inputs: np.ndarray, thresholds: Sequence[float], options: dict,
            code: str) -> bool:
    """Merge again, with the exact thresholds, the positions ``index`` (inputs ``inputs``), and rewrite them."""
    if not index.size:
        return True
    n = len(inputs) - 1
    weights = options.get("weights") or [1.0] * n
    out, work = np.empty(index.size, np.float32), _work(n)
    for s, e in sub_blocks(index.size):
        ties_block(inputs[0, s:e], [inputs[j, s:e] for j in range(1, n + 1)], thresholds, weights, options["by"],
                   float(options["lam"]), out[s:e], work.view(e - s))
    writer.rewrite_at(name, index, out if code == "F32" else out.astype(DTYPES[code]))
    return all_finite(out)
