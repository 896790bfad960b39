"""TIES's block arithmetic compiled by numba, for :func:`mckit.merge.ties_kernel.ties_block`: the float32
operations of the in-memory TIES (:func:`mckit.merge.kernels.ties_inplace`) in the same order, bit for bit
the same result (tests compare both), fused into 2n + 2 passes over a piece; the numpy passes it replaced
took about 38 for n = 3 experts (4.1 against 11.5 ns per entry on one core, 2^16-entry pieces).

Per expert i (pass 1): trimmed_i = tau_i [|tau_i| >= t_i], g += w_i trimmed_i, and, when brackets are
observed, the count of |tau_i| > hi_i and the positions where [|tau_i| >= t_i] differs from
[|tau_i| > hi_i]; gamma = +1 where g >= 0, else -1; per expert (pass 2): a_i = max(gamma trimmed_i, 0),
numerator += w_i a_i, D += [a_i > 0] (``by="count"``) or w_i [a_i > 0]; last: theta_0 + lam gamma
numerator / D (D := 1 where 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit

F0 = np.float32(0.0)
F1 = np.float32(1.0)


@njit(nogil=True, cache=True)
def _trim(theta, theta_0, t, w, first, trimmed, g, hi, observe, uncertain):
    """One expert: its trimmed task vector into ``trimmed``, w * it into the sign sum ``g``; returns the count of
    |tau| > ``hi`` and marks in ``uncertain`` where [|tau| >= t] and [|tau| > hi] differ (``observe``)."""
    above = 0
    for j in range(theta_0.shape[0]):
        tau = theta[j] - theta_0[j]
        mag = abs(tau)
        keep = mag >= t
        x = tau if keep else tau * F0
        trimmed[j] = x
        y = x * w
        g[j] = y if first else g[j] + y
        if observe:
            big = mag > hi
            above += big
            uncertain[j] = (keep != big) if first else (uncertain[j] or keep != big)
    return above


@njit(nogil=True, cache=True)
def _agree(trimmed, gamma, w, dw, first, num, den):
    """One expert's agreeing magnitudes a = max(gamma trimmed, 0): w a into ``num``, dw [a > 0] into ``den``."""
    for j in range(gamma.shape[0]):
        x = trimmed[j] * gamma[j]
        a = x if (x > F0 or x != x) else F0
        f = F1 if a > F0 else F0
        num[j] = a * w if first else num[j] + a * w
        den[j] = f * dw if first else den[j] + f * dw


@njit(nogil=True, cache=True)
def ties_fused(theta_0, thetas, thresholds, weights, by_count, lam, out, trimmed, g, num, den, hi, above, uncertain):
    """TIES of one piece into ``out`` (module doc). ``thetas``: a tuple of n float32 arrays like ``theta_0``;
    ``thresholds``, ``weights``, ``hi``: float32 (n,); ``trimmed``: a tuple of n and ``g``, ``num``, ``den``
    three float32 (m,) work buffers. With ``hi`` non-empty, ``above[i]`` (int64) grows by the count of |tau_i| > hi_i
    and ``uncertain`` (bool, (m,)) is set where some expert's trim at t_i and at hi_i differ. ``num`` is left
    holding lam * merged."""
    n = len(thetas)
    observe = hi.shape[0] > 0
    for i in range(n):
        above[i] += _trim(thetas[i], theta_0, thresholds[i], weights[i], i == 0, trimmed[i], g,
                          hi[i] if observe else F0, observe, uncertain)
    for j in range(g.shape[0]):
        g[j] = F1 if g[j] >= F0 else -F1
    for i in range(n):
        _agree(trimmed[i], g, weights[i], F1 if by_count else weights[i], i == 0, num, den)
    for j in range(g.shape[0]):
        d = den[j]
        d = d if d != F0 else F1
        merged = (num[j] * g[j]) / d * lam
        num[j] = merged
        out[j] = merged + theta_0[j]
