"""Model-merging algorithms as pure functions on float32 torch tensors.

Notation (METHODS.md sections 6-7): one base weight ``theta_0`` and ``n`` expert
weights ``theta_i`` of the same shape (for a linear layer ``(m, d)`` =
``(out_features, in_features)``).  The task vector of expert ``i`` is
``tau_i = theta_i - theta_0``, always computed in float32.  Every method returns
the merged weight ``theta`` (float32, same shape as ``theta_0``); the inputs are
never modified.

Methods (one function each, registered in :mod:`mckit.merge.registry`):

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
(:func:`mckit.merge.thresholds.global_magnitude_thresholds`); the TIES disjoint mean divides by the
count of agreeing entries (``by="count"``, paper and PEFT) or by the sum of
their weights (``by="weight"``, mergekit ``normalize``).

Methods that need an SVD (``tsv``, ``iso_c``, ``wudi``, ``optmerge``,
``optmerge_lora``) are defined for 2-D weights only.  Given a tensor of any
other rank they return their starting point instead: task arithmetic
``theta_0 + lam * sum_i tau_i`` for ``tsv``, ``iso_c``, ``wudi`` and
``optmerge``, and ``theta_0 + lam * mean_i tau_i`` for ``optmerge_lora``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mckit.merge.objectives import low_rank, minimise, optmerge_objective, polar, wudi_loss
from mckit.merge.registry import check_fraction
from mckit.merge.thresholds import kth_largest

__all__ = [
    "task_vectors", "lora_delta", "task_vector_sum", "average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "tsv", "iso_c",
    "wudi", "optmerge", "optmerge_lora", "magnitude_threshold", "trim", "all_finite", "check_finite", "elect_sign",
    "disjoint_mean", "ties_merge", "dare_drop", "dare_taus",
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


def check_inputs(theta_0: Tensor, thetas: Sequence[Tensor]) -> None:
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


# ---------------------------------------------------------- linear methods
def average(theta_0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
    """Weight average ("model soups", Wortsman et al. 2022): theta = mean_i theta_i.

    ``theta_0`` only fixes the shape (and is validated); it does not enter the mean.
    """
    check_inputs(theta_0, thetas)
    out = thetas[0].float().clone()
    for theta in thetas[1:]:
        out.add_(theta.float())
    return out.div_(len(thetas))


def task_vector_sum(taus: Sequence[Tensor], lams: Sequence[float] | None = None) -> Tensor:
    """The task-arithmetic combination of task vectors: sum_i lam_i tau_i (all lam_i = 1 by default).

    taus: n tensors of one shape; lams: one coefficient per task vector (NaiveMC: 1/n each).
    """
    if lams is None:
        return torch.stack(list(taus)).sum(dim=0)
    if len(lams) != len(taus):
        raise ValueError(f"{len(lams)} coefficients for {len(taus)} task vectors")
    return sum(lam * tau for lam, tau in zip(lams, taus))


def task_arithmetic(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

    theta = theta_0 + lam * sum_i tau_i,  tau_i = theta_i - theta_0.
    """
    check_inputs(theta_0, thetas)
    return theta_0.float() + lam * task_vector_sum(task_vectors(theta_0, thetas))


# --------------------------------------------------------------------- TIES
def magnitude_threshold(tau: Tensor, keep: float) -> float:
    """Magnitude of the k-th largest ``|tau|`` entry, ``k = int(keep * numel)``.

    Entries with ``|tau| >= threshold`` are kept (PEFT/mergekit: k truncated
    with ``int``).  Entries tied with the threshold are all kept, so more than
    k may survive when magnitudes repeat; PEFT and mergekit keep exactly k
    (top-k/argsort indices, arbitrary among ties).  Returns ``inf`` (keep nothing) when ``k == 0``.  Uses
    ``torch.kthvalue`` (selection, O(numel)) rather than a full sort.
    """
    return kth_largest(tau.abs(), keep)


def trim(tau: Tensor, threshold: float) -> Tensor:
    """TIES step 1 (trim): ``tau * [|tau| >= threshold]`` (new tensor)."""
    return tau.masked_fill(tau.abs() < threshold, 0.0)


def elect_sign(trimmed: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """TIES step 2 (elect): gamma = sign(sum_i w_i * trimmed_i), with +1 where the sum is 0.

    The tie-break (sum == 0 -> +1) is PEFT's "total" majority-sign method.
    Returns a float32 tensor of +-1, shaped like each ``trimmed_i``.
    """
    w = _weights(weights, len(trimmed))
    total = sum(w_i * t for w_i, t in zip(w, trimmed))
    return torch.where(total >= 0, 1.0, -1.0)


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
    agree = [(t * gamma > 0).float() for t in trimmed]
    numerator = sum(w_i * t * a for w_i, t, a in zip(w, trimmed, agree))
    denominator = sum((1.0 if by == "count" else w_i) * a for w_i, a in zip(w, agree))
    return numerator / denominator.masked_fill(denominator == 0, 1.0)


def ties_merge(taus: Sequence[Tensor], thresholds: Sequence[float], weights: Sequence[float] | None = None,
               by: str = "count") -> Tensor:
    """TIES on task vectors: trim -> elect sign -> disjoint mean (the merged task vector, before lam).

    taus: n tensors of one shape; thresholds: one magnitude per expert
    (:func:`magnitude_threshold` per tensor, or a global one).
    """
    if len(thresholds) != len(taus):
        raise ValueError(f"thresholds has {len(thresholds)} entries for {len(taus)} experts")
    trimmed = [trim(tau, thr) for tau, thr in zip(taus, thresholds)]
    gamma = elect_sign(trimmed, weights)
    return disjoint_mean(trimmed, gamma, weights, by)


def ties(theta_0: Tensor, thetas: Sequence[Tensor], *, keep: float = 0.2, lam: float = 1.0,
         by: str = "count", weights: Sequence[float] | None = None,
         thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models").

    tau_i = theta_i - theta_0;
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
    check_inputs(theta_0, thetas)
    taus = task_vectors(theta_0, thetas)
    if thresholds is None:
        thresholds = [magnitude_threshold(tau, keep) for tau in taus]
    return theta_0.float() + lam * ties_merge(taus, thresholds, weights, by)


# --------------------------------------------------------------------- DARE
def dare_drop(tau: Tensor, drop: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario"): drop and rescale.

    Each entry is zeroed with probability ``drop`` and the rest are scaled by
    ``1 / (1 - drop)``, so ``E[result] = tau``.  ``drop`` in ``[0, 1)``.
    """
    drop = check_fraction("drop", drop, closed_low=True, closed_high=False)
    kept = torch.rand(tau.shape, generator=generator) >= drop
    return torch.where(kept, tau, 0.0).div_(1.0 - drop)


def dare_taus(theta_0: Tensor, thetas: Sequence[Tensor], drop: float, seed: int) -> list[Tensor]:
    """DARE(tau_i) for each expert; expert i draws its mask from ``manual_seed(seed + i)``."""
    return [dare_drop(tau, drop, torch.Generator().manual_seed(int(seed) + i))
            for i, tau in enumerate(task_vectors(theta_0, thetas))]


def dare_ta(theta_0: Tensor, thetas: Sequence[Tensor], *, drop: float = 0.2, lam: float = 1.0,
            seed: int = 0) -> Tensor:
    """DARE + task arithmetic: theta_0 + lam * sum_i DARE(tau_i).

    Expert i draws its mask from ``torch.Generator().manual_seed(seed + i)``.
    """
    check_inputs(theta_0, thetas)
    return theta_0.float() + lam * task_vector_sum(dare_taus(theta_0, thetas, drop, seed))


def dare_ties(theta_0: Tensor, thetas: Sequence[Tensor], *, drop: float = 0.2, keep: float = 1.0,
              lam: float = 1.0, by: str = "count", weights: Sequence[float] | None = None,
              seed: int = 0, thresholds: Sequence[float] | None = None) -> Tensor:
    """DARE + TIES: drop -> trim -> elect sign -> disjoint mean.

    theta = theta_0 + lam * TIES(DARE(tau_1), ..., DARE(tau_n)), TIES trimming to ``keep``
    (default 1.0: no magnitude trim, as PEFT's and mergekit's ``dare_ties``:
    random pruning replaces it).  Same seeding as :func:`dare_ta`.
    """
    check_inputs(theta_0, thetas)
    taus = dare_taus(theta_0, thetas, drop, seed)
    if thresholds is None:
        thresholds = [magnitude_threshold(tau, keep) for tau in taus]
    return theta_0.float() + lam * ties_merge(taus, thresholds, weights, by)


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
    check_inputs(theta_0, thetas)
    if not _is_matrix(theta_0):
        return task_arithmetic(theta_0, thetas, lam=lam)
    taus = task_vectors(theta_0, thetas)
    r = max(1, min(theta_0.shape) // len(taus))
    parts = [low_rank(tau, r) for tau in taus]
    U = torch.cat([p[0] for p in parts], dim=1)
    S = torch.cat([p[1] for p in parts])
    V = torch.cat([p[2] for p in parts], dim=1)
    tau_m = polar(U) @ torch.diag(S) @ polar(V).T
    return tau_m.mul_(lam).add_(theta_0.float())


def iso_c(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0) -> Tensor:
    """Iso-C (Marczak et al. 2025, "No task left behind: isotropic model merging").

    ``sum_i tau_i = U diag(S) V^T`` (all ``min(m, d)`` components);
    ``tau_iso = mean(S) * U V^T`` (flattened spectrum); theta = theta_0 + lam * tau_iso.
    Non-2-D tensors: task arithmetic.
    """
    check_inputs(theta_0, thetas)
    if not _is_matrix(theta_0):
        return task_arithmetic(theta_0, thetas, lam=lam)
    total = torch.stack(task_vectors(theta_0, thetas)).sum(dim=0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    tau_iso = S.mean() * (U @ Vh)
    return tau_iso.mul_(lam).add_(theta_0.float())


def wudi(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0, lr: float = 1e-5,
         steps: int = 300, losses: list[float] | None = None) -> Tensor:
    """WUDI merging (Cheng et al. 2025, "Whoever started the interference should end it").

    X* = argmin_X  sum_i ||(X - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2,
    by Adam (``lr``, ``steps``; defaults 1e-5 and 300) from X = sum_i tau_i;
    theta = theta_0 + lam * X*.  Non-2-D tensors: the init (task arithmetic).
    """
    check_inputs(theta_0, thetas)
    if not _is_matrix(theta_0):
        return task_arithmetic(theta_0, thetas, lam=lam)
    taus = task_vectors(theta_0, thetas)
    init = torch.stack(taus).sum(dim=0)
    X = minimise(lambda X: wudi_loss(X, taus), init, "adam", lr, steps, losses)
    return X.mul_(lam).add_(theta_0.float())


def _optmerge(theta_0: Tensor, thetas: Sequence[Tensor], *, variant: str, lam: float, lr: float, steps: int,
              rank_ratio: float | None, losses: list[float] | None) -> Tensor:
    """theta_0 + lam * X*, X* from :func:`optmerge_objective`; non-2-D tensors take X = the init."""
    check_inputs(theta_0, thetas)
    taus = task_vectors(theta_0, thetas)
    if not _is_matrix(theta_0):
        stacked = torch.stack(taus)
        X = stacked.sum(dim=0) if variant == "full" else stacked.mean(dim=0)
    else:
        X = optmerge_objective(taus, variant=variant, lr=lr, steps=steps, rank_ratio=rank_ratio, losses=losses)
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
    return _optmerge(theta_0, thetas, variant="full", lam=lam, lr=lr, steps=steps, rank_ratio=rank_ratio,
                     losses=losses)


def optmerge_lora(theta_0: Tensor, thetas: Sequence[Tensor], *, lam: float = 1.0, lr: float = 1e-4,
                  steps: int = 300, rank_ratio: float | None = None,
                  losses: list[float] | None = None) -> Tensor:
    """OptMerge, LoRA variant (Wei et al. 2025): for task vectors that are LoRA products.

    target_i = lowrank_k(tau_i), proxy_i = diag(S_k) V_k^T of tau_i, same loss as
    :func:`optmerge`, SGD (``lr`` 1e-4, momentum 0.9, ``steps`` 300) from
    X = mean_i tau_i (a sum init blows the norm up); theta = theta_0 + lam * X*.
    Non-2-D tensors: the init ``theta_0 + lam * mean_i tau_i``.
    """
    return _optmerge(theta_0, thetas, variant="lora", lam=lam, lr=lr, steps=steps, rank_ratio=rank_ratio,
                     losses=losses)
