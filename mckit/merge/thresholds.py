"""Magnitude thresholds for TIES's trim: the k-th largest |tau| of one tensor, or of a whole model streamed.

``k = int(keep * numel)``, truncated as PEFT and mergekit do; ``keep`` is the fraction KEPT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from mckit.merge.registry import check_fraction


def kth_largest(magnitudes: Tensor, keep: float) -> float:
    """k-th largest entry of a non-negative tensor, ``k = int(keep * numel)`` (inf if k == 0)."""
    keep = check_fraction("keep", keep)
    numel = magnitudes.numel()
    k = int(keep * numel)
    if k == 0:
        return math.inf
    if k == numel:
        return 0.0
    return float(torch.kthvalue(magnitudes.reshape(-1), numel - k + 1).values)


def streamed_magnitude_threshold(make_stream: Callable[[], Iterable[Tensor]], keep: float) -> float:
    """Exact k-th largest ``|x|`` over many tensors, streaming, ``k = int(keep * N)``.

    Two passes over ``make_stream()`` (a fresh iterable of float32 tensors each
    call), memory O(one tensor + 2^16 counters).  Non-negative float32 numbers
    are ordered like their int32 bit patterns, so pass 1 counts the high 16
    bits of every ``|x|`` (a histogram with 2^15 bins, each 1/128 octave wide)
    and finds the bin holding the k-th largest; pass 2 counts the low 16 bits
    of the entries in that bin, which pins down the exact float32 value.
    The result is identical to ``kthvalue`` on the concatenation.
    """
    keep = check_fraction("keep", keep)
    high = torch.zeros(1 << 15, dtype=torch.int64)
    total = 0
    for x in make_stream():
        bits = x.float().abs().reshape(-1).view(torch.int32)
        high += torch.bincount(bits >> 16, minlength=1 << 15)
        total += bits.numel()
    k = int(keep * total)
    if k == 0:
        return math.inf
    from_top = high.flip(0).cumsum(0)                 # entries in this bin or above
    position = int(torch.searchsorted(from_top, k))   # first bin (from the top) reaching k
    bin_hi = (1 << 15) - 1 - position
    above = int(from_top[position - 1]) if position > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for x in make_stream():
        bits = x.float().abs().reshape(-1).view(torch.int32)
        low += torch.bincount(bits[(bits >> 16) == bin_hi] & 0xFFFF, minlength=1 << 16)
    position_lo = int(torch.searchsorted(low.flip(0).cumsum(0), k - above))
    bits_value = (bin_hi << 16) | ((1 << 16) - 1 - position_lo)
    return float(torch.tensor([bits_value], dtype=torch.int32).view(torch.float32))


def global_magnitude_thresholds(theta_0: dict[str, Tensor], thetas: Sequence[dict[str, Tensor]],
                                keep: float, names: Iterable[str] | None = None) -> list[float]:
    """Per-expert magnitude threshold for TIES with a global top-k (TIES paper, FusionBench).

    For each expert i the threshold is the k-th largest ``|tau_i|`` over all
    tensors ``names`` (default: all of ``theta_0``) flattened together,
    ``k = int(keep * total numel)``.  Pass the result to ``ties(thresholds=...)``.
    """
    names = list(theta_0) if names is None else list(names)
    return [streamed_magnitude_threshold(
                lambda sd=sd: (sd[n].float() - theta_0[n].float() for n in names), keep)
            for sd in thetas]
