"""Model-merging algorithms as pure functions on float32 torch tensors.

Notation (METHODS.md sections 6-7): one base weight ``theta_0`` and ``n`` expert
weights ``theta_i`` of the same shape (for a linear layer ``(m, d)`` =
``(out_features, in_features)``).  The task vector of expert ``i`` is
``tau_i = theta_i - theta_0``, always computed in float32.  Every method returns
the merged weight ``theta`` (float32, same shape as ``theta_0``); the inputs are
never modified.

Methods (one function each, all registered in :data:`METHODS`):

===================  =========================================================
``average``          theta = mean_i theta_i                     (Wortsman 2022)
``task_arithmetic``  theta_0 + lam * sum_i tau_i                (Ilharco 2023)
``ties``             trim / elect sign / disjoint mean          (Yadav 2023)
``dare_ta``          DARE drop+rescale, then task arithmetic    (Yu 2024)
``dare_ties``        DARE drop+rescale, then TIES               (Yu 2024)
``tsv``              TSV-M, task singular vectors               (Gargiulo 2025)
``iso_c``            Iso-C, isotropic merging                   (Marczak 2025)
``wudi``             WUDI, data-free interference minimisation  (Cheng 2025)
``optmerge``         OptMerge, full fine-tuning variant         (Wei 2025)
``optmerge_lora``    OptMerge, LoRA variant                     (Wei 2025)
===================  =========================================================

Conventions that differ between tools (METHODS.md section 7) are explicit
options: ``keep`` is always the fraction of entries KEPT; TIES can trim per
tensor (``keep``) or with precomputed global ``thresholds``
(:func:`global_magnitude_thresholds`); the TIES disjoint mean divides by the
count of agreeing entries (``by="count"``, paper and PEFT) or by the sum of
their weights (``by="weight"``, mergekit ``normalize``).

Methods that need an SVD (``tsv``, ``iso_c``, ``wudi``, ``optmerge``,
``optmerge_lora``) are defined for 2-D weights only.  Given a tensor of any
other rank they return their starting point instead: task arithmetic
``theta_0 + lam * sum_i tau_i`` for ``tsv``, ``iso_c``, ``wudi`` and
``optmerge``, and ``theta_0 + lam * mean_i tau_i`` for ``optmerge_lora``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from mckit.merge_options import check_fraction, check_method

__all__ = [
    "METHODS", "get_method", "task_vectors", "lora_delta",
    "average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "tsv", "iso_c",
    "wudi", "optmerge", "optmerge_lora",
    "magnitude_threshold", "trim", "all_finite", "check_finite", "elect_sign", "disjoint_mean", "dare_drop",
    "global_magnitude_thresholds", "streamed_magnitude_threshold",
    "wudi_loss", "optmerge_targets", "optmerge_loss", "low_rank",
]


# ----------------------------------------------------------------- validation
def all_finite(tensor: Tensor) -> bool:
    """True if no entry is NaN or +-Inf.

    Fast path: a NaN or Inf entry always makes the sum NaN or Inf, so a finite
    sum proves every entry finite (one reduction, no boolean temporary); only
    a non-finite sum (a bad entry, or an overflow) needs the entry-wise test.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the tensor if it holds a NaN or an Inf."""
    if not all_finite(tensor):
        raise ValueError(f"tensor {name} contains NaN or Inf")


def _check_inputs(theta_0: Tensor, thetas: Sequence[Tensor]) -> None:
    if len(thetas) == 0:
        raise ValueError("thetas is empty: need at least one expert weight")
    check_finite(theta_0, "theta_0")
    for i, theta in enumerate(thetas):
        if theta.shape != theta_0.shape:
            raise ValueError(f"tensor thetas[{i}] has shape {tuple(theta.shape)}, "
                             f"theta_0 has {tuple(theta_0.shape)}")
        check_finite(theta, f"thetas[{i}]")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} experts")
    return [float(w) for w in weights]


# ------------------------------------------------------------------- helpers
def task_vectors(theta_0: Tensor, thetas: Sequence[Tensor]) -> list[Tensor]:
    """tau_i = theta_i - theta_0 in float32; each ``(m, d)`` like ``theta_0``."""
    base = theta_0.float()
    return [theta.float() - base for theta in thetas]


def lora_delta(A: Tensor, B: Tensor, scale: float = 1.0) -> Tensor:
    """Dense weight update of a LoRA adapter: ``delta W = B @ A * scale``.

    ``A``: ``(r, d_in)``, ``B``: ``(d_out, r)``, ``scale`` = alpha / r; returns
    ``(d_out, d_in)`` float32.  LoRA adapters are merged as these products
    (task vectors), never by averaging the ``A`` and ``B`` factors separately:
    ``mean(B) @ mean(A) != mean(B @ A)``.
    """
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"LoRA shapes do not chain: B {tuple(B.shape)} @ A {tuple(A.shape)}")
    return (B.float() @ A.float()) * float(scale)


def low_rank(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``matrix ~ U_k diag(S_k) V_k^T``: ``(m,k)``, ``(k,)``, ``(d,k)``."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


def _polar(matrix: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns (or rows): ``P Q^T`` from ``P S Q^T``."""
    P, _, Qh = torch.linalg.svd(matrix, full_matrices=False)
    return P @ Qh


# ---------------------------------------------------------- linear methods
def average(theta_0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
    """Weight average ("model soups", Wortsman et al. 2022): theta = mean_i theta_i.

    ``theta_0`` only fixes the shape (and is validated); it does not enter the mean.
    """
    _check_inputs(theta_0, thetas)
    out = thetas[0].float().clone()
    for theta in thetas[1:]:
        out.add_(theta.float())
    return out.div_(len(thetas))


def task_arithmetic(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

    theta = theta_0 + lam * sum_i tau_i,  tau_i = theta_i - theta_0.
    """
    _check_inputs(theta_0, thetas)
    total = torch.zeros_like(theta_0, dtype=torch.float32)
    for theta in thetas:
        total.add_(theta.float())
    total.sub_(theta_0.float(), alpha=len(thetas))          # sum_i tau_i
    return total.mul_(lam).add_(theta_0.float())


# --------------------------------------------------------------------- TIES
def magnitude_threshold(tau: Tensor, keep: float) -> float:
    """Magnitude of the k-th largest ``|tau|`` entry, ``k = int(keep * numel)``.

    Entries with ``|tau| >= threshold`` are kept (PEFT/mergekit: k truncated
    with ``int``).  Entries tied with the threshold are all kept, so more than
    k may survive when magnitudes repeat; PEFT and mergekit keep exactly k
    (top-k/argsort indices, arbitrary among ties).  Returns ``inf`` (keep nothing) when ``k == 0``.  Uses
    ``torch.kthvalue`` (selection, O(numel)) rather than a full sort.
    """
    return _kth_largest(tau.abs(), keep)


def _kth_largest(magnitudes: Tensor, keep: float) -> float:
    """k-th largest entry of a non-negative tensor, ``k = int(keep * numel)`` (inf if k == 0)."""
    keep = check_fraction("keep", keep)
    numel = magnitudes.numel()
    k = int(keep * numel)
    if k == 0:
        return math.inf
    if k == numel:
        return 0.0
    return float(torch.kthvalue(magnitudes.reshape(-1), numel - k + 1).values)


def trim(tau: Tensor, threshold: float) -> Tensor:
    """TIES step 1 (trim): ``tau * [|tau| >= threshold]`` (new tensor)."""
    return tau.masked_fill(tau.abs() < threshold, 0.0)


def _trim_top_k_(tau: Tensor, keep: float | None, threshold: float | None) -> Tensor:
    """In-place trim of an owned task vector, computing ``|tau|`` once.

    Same result as ``trim(tau, threshold or magnitude_threshold(tau, keep))``.
    """
    magnitudes = tau.abs()
    if threshold is None:
        threshold = _kth_largest(magnitudes, keep)
    return tau.mul_(magnitudes.ge_(threshold))             # ge_ leaves 1.0 / 0.0 in place


def elect_sign(trimmed: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """TIES step 2 (elect): gamma = sign(sum_i w_i * trimmed_i), with +1 where the sum is 0.

    The tie-break (sum == 0 -> +1) is PEFT's "total" majority-sign method.
    Returns a float32 tensor of +-1.
    """
    w = _weights(weights, len(trimmed))
    total = torch.mul(trimmed[0], w[0])
    for w_i, t in zip(w[1:], trimmed[1:]):
        total.add_(t, alpha=w_i)
    return total.ge_(0).mul_(2).sub_(1)                    # 1 if sum >= 0 else -1, in place


def disjoint_mean(trimmed: Sequence[Tensor], gamma: Tensor, weights: Sequence[float] | None = None,
                  by: str = "count") -> Tensor:
    """TIES step 3 (disjoint merge) of the entries that agree with the elected sign.

    agree_i = [trimmed_i * gamma > 0]  (trimmed zeros never agree)
    merged  = sum_i w_i trimmed_i agree_i / D,   D = sum_i agree_i       (by="count", paper/PEFT)
                                                 D = sum_i w_i agree_i   (by="weight", mergekit normalize)
    with D := 1 where no expert agrees (the merged entry is then 0).
    """
    if by not in ("count", "weight"):
        raise ValueError(f"by must be 'count' or 'weight', got {by!r}")
    w = _weights(weights, len(trimmed))
    numerator = torch.zeros_like(gamma)                    # sum_i w_i |trimmed_i| agree_i
    denominator = torch.zeros_like(gamma)
    aligned = torch.empty_like(gamma)                      # one reused buffer, no per-expert temporaries
    for w_i, t in zip(w, trimmed):
        torch.mul(t, gamma, out=aligned).clamp_(min=0)     # |t| where t agrees with gamma, else 0
        numerator.add_(aligned, alpha=w_i)
        denominator.add_(aligned.sign_(), alpha=1.0 if by == "count" else w_i)   # agree_i as 0/1
    denominator.masked_fill_(denominator == 0, 1.0)
    return numerator.mul_(gamma).div_(denominator)


def _map_experts(fn: Callable, taus: Sequence[Tensor], *others: Sequence) -> list:
    """``[fn(tau_i, *others_i)]``, on a thread per CPU core for large tensors.

    ``torch.kthvalue`` on one flat tensor runs on a single core; the experts'
    thresholds are independent, so they are computed side by side.
    """
    workers = min(len(taus), torch.get_num_threads())
    if workers < 2 or taus[0].numel() < (1 << 20):
        return [fn(*args) for args in zip(taus, *others)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, taus, *others))


def _ties_from_taus(theta_0: Tensor, taus: Sequence[Tensor], keep: float,
                    thresholds: Sequence[float | None] | None, lam: float,
                    by: str, weights: Sequence[float] | None) -> Tensor:
    """TIES on owned task vectors (trimmed in place)."""
    if thresholds is None:
        thresholds = [None] * len(taus)
    elif len(thresholds) != len(taus):
        raise ValueError(f"thresholds has {len(thresholds)} entries for {len(taus)} experts")
    trimmed = _map_experts(lambda tau, thr: _trim_top_k_(tau, keep, thr), taus, thresholds)
    gamma = elect_sign(trimmed, weights)
    merged = disjoint_mean(trimmed, gamma, weights, by)
    return merged.mul_(lam).add_(theta_0.float())


def ties(theta_0: Tensor, thetas: Sequence[Tensor], *, keep: float = 0.2, lam: float = 1.0,
         by: str = "count", weights: Sequence[float] | None = None,
         thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models").

    1. trim: keep the top ``keep`` fraction of each tau_i by magnitude;
    2. elect: gamma = sign(sum_i w_i trimmed_i);
    3. disjoint mean of the entries agreeing with gamma (see :func:`disjoint_mean`);
    theta = theta_0 + lam * merged.

    Scope of the top-k: per tensor by default (PEFT, mergekit).  For the
    paper's global top-k over the whole model pass ``thresholds`` (one
    magnitude per expert, from :func:`global_magnitude_thresholds`); ``keep``
    is then not used.  ``weights`` (default all 1) scale each expert as in
    mergekit; the paper has none.
    """
    _check_inputs(theta_0, thetas)
    if thresholds is None:
        check_fraction("keep", keep)
    return _ties_from_taus(theta_0, task_vectors(theta_0, thetas), keep, thresholds, lam, by, weights)


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


# --------------------------------------------------------------------- DARE
def dare_drop(tau: Tensor, drop: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario"): drop and rescale.

    Each entry is zeroed with probability ``drop`` and the rest are scaled by
    ``1 / (1 - drop)``, so ``E[result] = tau``.  ``drop`` in ``[0, 1)``.
    """
    drop = check_fraction("drop", drop, closed_low=True, closed_high=False)
    kept = torch.rand(tau.shape, generator=generator) >= drop
    return torch.where(kept, tau, 0.0).div_(1.0 - drop)


def _dare_taus(theta_0: Tensor, thetas: Sequence[Tensor], drop: float, seed: int) -> list[Tensor]:
    """DARE(tau_i) for each expert; expert i draws its mask from ``manual_seed(seed + i)``."""
    return [dare_drop(tau, drop, torch.Generator().manual_seed(int(seed) + i))
            for i, tau in enumerate(task_vectors(theta_0, thetas))]


def dare_ta(theta_0: Tensor, thetas: Sequence[Tensor], *, drop: float = 0.2, lam: float = 1.0,
            seed: int = 0) -> Tensor:
    """DARE + task arithmetic: theta_0 + lam * sum_i DARE(tau_i).

    Expert i draws its mask from ``torch.Generator().manual_seed(seed + i)``.
    """
    _check_inputs(theta_0, thetas)
    total = torch.zeros_like(theta_0, dtype=torch.float32)
    for tau in _dare_taus(theta_0, thetas, drop, seed):
        total.add_(tau)
    return total.mul_(lam).add_(theta_0.float())


def dare_ties(theta_0: Tensor, thetas: Sequence[Tensor], *, drop: float = 0.2, keep: float = 1.0,
              lam: float = 1.0, by: str = "count", weights: Sequence[float] | None = None,
              seed: int = 0, thresholds: Sequence[float] | None = None) -> Tensor:
    """DARE + TIES: DARE(tau_i), then TIES trim (``keep``), elect and disjoint mean.

    With the default ``keep=1.0`` no magnitude trimming happens (PEFT's and
    mergekit's ``dare_ties``: random pruning replaces the magnitude trim).
    Same seeding as :func:`dare_ta`.
    """
    _check_inputs(theta_0, thetas)
    if thresholds is None:
        check_fraction("keep", keep)
    return _ties_from_taus(theta_0, _dare_taus(theta_0, thetas, drop, seed), keep, thresholds, lam, by, weights)


# ----------------------------------------------------------- SVD methods
def _is_matrix(theta_0: Tensor) -> bool:
    return theta_0.dim() == 2


def tsv(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0) -> Tensor:
    """TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: reducing task interference").

    Per matrix ``(m, d)``: ``tau_i ~ U_i diag(S_i) V_i^T`` keeping
    ``r = max(1, min(m, d) // n)`` components; concatenate
    ``U = [U_1..U_n]`` ``(m, n r)``, ``S`` ``(n r,)``, ``V = [V_1..V_n]`` ``(d, n r)``;
    orthogonalise with the polar factor ``U_perp = P Q^T`` where ``U = P Sigma Q^T``
    (same for V); ``tau_m = U_perp diag(S) V_perp^T``; theta = theta_0 + lam * tau_m.
    Non-2-D tensors: task arithmetic.
    """
    _check_inputs(theta_0, thetas)
    if not _is_matrix(theta_0):
        return task_arithmetic(theta_0, thetas, lam=lam)
    taus = task_vectors(theta_0, thetas)
    r = max(1, min(theta_0.shape) // len(taus))
    parts = [low_rank(tau, r) for tau in taus]
    U = torch.cat([p[0] for p in parts], dim=1)
    S = torch.cat([p[1] for p in parts])
    V = torch.cat([p[2] for p in parts], dim=1)
    tau_m = _polar(U) @ torch.diag(S) @ _polar(V).T
    return tau_m.mul_(lam).add_(theta_0.float())


def iso_c(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0) -> Tensor:
    """Iso-C (Marczak et al. 2025, "No task left behind: isotropic model merging").

    ``sum_i tau_i = U diag(S) V^T`` (all ``min(m, d)`` components);
    ``tau_iso = mean(S) * U V^T`` (flattened spectrum); theta = theta_0 + lam * tau_iso.
    Non-2-D tensors: task arithmetic.
    """
    _check_inputs(theta_0, thetas)
    if not _is_matrix(theta_0):
        return task_arithmetic(theta_0, thetas, lam=lam)
    total = torch.stack(task_vectors(theta_0, thetas)).sum(dim=0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    tau_iso = S.mean() * (U @ Vh)
    return tau_iso.mul_(lam).add_(theta_0.float())


# ---------------------------------------------- optimisation-based methods
def _minimise(loss_fn: Callable[[Tensor], Tensor], init: Tensor, optimizer: str, lr: float,
              steps: int, losses: list[float] | None) -> Tensor:
    """Gradient descent on ``X`` (float32) from ``init``; appends each step's loss to ``losses``."""
    X = init.detach().clone().requires_grad_(True)
    if optimizer == "adam":
        opt = torch.optim.Adam([X], lr=lr)
    else:
        opt = torch.optim.SGD([X], lr=lr, momentum=0.9)
    with torch.enable_grad():
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(X)
            loss.backward()
            opt.step()
            if losses is not None:
                losses.append(float(loss.detach()))
    return X.detach()


def wudi_loss(X: Tensor, taus: Sequence[Tensor]) -> Tensor:
    """WUDI objective: sum_i ||(X - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (scalar).

    ``X``, ``tau_i``: ``(m, d)``; ``(X - tau_i) tau_i^T`` is ``(m, m)``.
    A zero task vector contributes nothing.
    """
    loss = X.new_zeros(())
    for tau in taus:
        norm2 = tau.pow(2).sum()
        if norm2 > 0:
            loss = loss + ((X - tau) @ tau.T).pow(2).sum() / norm2
    return loss


def wudi(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0, lr: float = 1e-5,
         steps: int = 300, losses: list[float] | None = None) -> Tensor:
    """WUDI merging (Cheng et al. 2025, "Whoever started the interference should end it").

    X* = argmin_X  sum_i ||(X - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2,
    by Adam (``lr``, ``steps``; defaults 1e-5 and 300) from X = sum_i tau_i;
    theta = theta_0 + lam * X*.  Non-2-D tensors: the init (task arithmetic).
    """
    _check_inputs(theta_0, thetas)
    if not _is_matrix(theta_0):
        return task_arithmetic(theta_0, thetas, lam=lam)
    taus = task_vectors(theta_0, thetas)
    init = torch.stack(taus).sum(dim=0)
    X = _minimise(lambda X: wudi_loss(X, taus), init, "adam", lr, steps, losses)
    return X.mul_(lam).add_(theta_0.float())


def _optmerge_rank(shape: torch.Size, n: int, rank_ratio: float | None) -> int:
    full = min(shape)
    if rank_ratio is None:
        return max(1, full // n)
    return max(1, int(check_fraction("rank_ratio", rank_ratio) * full))


def optmerge_targets(taus: Sequence[Tensor], k: int, variant: str = "full") -> tuple[list[Tensor], list[Tensor]]:
    """OptMerge targets and proxies (Wei et al. 2025), per task vector ``(m, d)``.

    variant "full": target_i = lowrank_k(tau_i - mean tau) + mean tau;
    variant "lora": target_i = lowrank_k(tau_i);
    both: proxy_i = diag(S_k) V_k^T of tau_i, shape ``(k, d)``.
    """
    mean = torch.stack(list(taus)).mean(dim=0)
    targets, proxies = [], []
    for tau in taus:
        U, S, V = low_rank(tau, k)
        proxies.append(torch.diag(S) @ V.T)
        if variant == "full":
            Uc, Sc, Vc = low_rank(tau - mean, k)
            targets.append(Uc @ torch.diag(Sc) @ Vc.T + mean)
        else:
            targets.append(U @ torch.diag(S) @ V.T)
    return targets, proxies


def optmerge_loss(X: Tensor, targets: Sequence[Tensor], proxies: Sequence[Tensor],
                  norms2: Sequence[float]) -> Tensor:
    """OptMerge objective: sum_i ||(X - target_i) proxy_i^T||_F^2 / ||tau_i||_F^2."""
    loss = X.new_zeros(())
    for target, proxy, norm2 in zip(targets, proxies, norms2):
        if norm2 > 0:
            loss = loss + ((X - target) @ proxy.T).pow(2).sum() / norm2
    return loss


def _optmerge(theta_0: Tensor, thetas: Sequence[Tensor], variant: str, lam: float, lr: float, steps: int,
              rank_ratio: float | None, losses: list[float] | None) -> Tensor:
    _check_inputs(theta_0, thetas)
    taus = task_vectors(theta_0, thetas)
    stacked = torch.stack(taus)
    init = stacked.sum(dim=0) if variant == "full" else stacked.mean(dim=0)
    if not _is_matrix(theta_0):
        return init.mul_(lam).add_(theta_0.float())
    k = _optmerge_rank(theta_0.shape, len(taus), rank_ratio)
    targets, proxies = optmerge_targets(taus, k, variant)
    norms2 = [float(tau.pow(2).sum()) for tau in taus]
    optimizer = "adam" if variant == "full" else "sgd"
    X = _minimise(lambda X: optmerge_loss(X, targets, proxies, norms2), init, optimizer, lr, steps, losses)
    return X.mul_(lam).add_(theta_0.float())


def optmerge(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0, lr: float = 1e-5,
             steps: int = 300, rank_ratio: float | None = None, losses: list[float] | None = None) -> Tensor:
    """OptMerge, full fine-tuning variant (Wei et al. 2025, "Unifying MLLM capabilities
    and modalities via model merging").

    Per matrix ``(m, d)``, ``k = max(1, min(m, d) // n)`` (or ``int(rank_ratio * min(m, d))``):
    target_i = lowrank_k(tau_i - mean tau) + mean tau, proxy_i = diag(S_k) V_k^T of tau_i,
    X* = argmin sum_i ||(X - target_i) proxy_i^T||_F^2 / ||tau_i||_F^2 by Adam
    (``lr`` 1e-5, ``steps`` 300) from X = sum_i tau_i; theta = theta_0 + lam * X*.
    Non-2-D tensors: the init (task arithmetic).
    """
    return _optmerge(theta_0, thetas, "full", lam, lr, steps, rank_ratio, losses)


def optmerge_lora(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0, lr: float = 1e-4,
                  steps: int = 300, rank_ratio: float | None = None,
                  losses: list[float] | None = None) -> Tensor:
    """OptMerge, LoRA variant (Wei et al. 2025): for task vectors that are LoRA products.

    target_i = lowrank_k(tau_i), proxy_i = diag(S_k) V_k^T of tau_i, same loss as
    :func:`optmerge`, SGD (``lr`` 1e-4, momentum 0.9, ``steps`` 300) from
    X = mean_i tau_i (a sum init blows the norm up); theta = theta_0 + lam * X*.
    Non-2-D tensors: the init ``theta_0 + lam * mean_i tau_i``.
    """
    return _optmerge(theta_0, thetas, "lora", lam, lr, steps, rank_ratio, losses)


# ----------------------------------------------------------------- registry
METHODS: dict[str, Callable[..., Tensor]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_ta": dare_ta,
    "dare_ties": dare_ties,
    "tsv": tsv,
    "iso_c": iso_c,
    "wudi": wudi,
    "optmerge": optmerge,
    "optmerge_lora": optmerge_lora,
}


def get_method(name: str) -> Callable[..., Tensor]:
    """Look up a merging function by name; unknown names list the valid ones."""
    return METHODS[check_method(name)]
