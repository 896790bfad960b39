"""The maths under the spectral and optimisation-based methods: truncated SVDs, WUDI's and OptMerge's losses.

Shapes: a task vector ``tau_i`` is ``(m, d)`` = (out_features, in_features).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mckit.merge.registry import check_fraction


def low_rank(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``matrix ~ U_k diag(S_k) V_k^T``: ``(m,k)``, ``(k,)``, ``(d,k)``."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


def polar(matrix: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns (or rows): ``P Q^T`` from ``P S Q^T``."""
    P, _, Qh = torch.linalg.svd(matrix, full_matrices=False)
    return P @ Qh


# ---------------------------------------------- optimisation-based methods
def minimise(loss_fn: Callable[[Tensor], Tensor], init: Tensor, optimizer: str, lr: float,
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


def optmerge_objective(taus: Sequence[Tensor], *, variant: str = "full", lr: float = 1e-5, steps: int = 300,
                       rank_ratio: float | None = None, losses: list[float] | None = None) -> Tensor:
    """OptMerge's merged task vector X* for 2-D task vectors ``tau_i`` ``(m, d)`` (Wei et al. 2025).

    k = max(1, min(m, d) // n), or int(rank_ratio * min(m, d));
    targets and proxies from :func:`optmerge_targets` (``variant`` "full" or "lora");
    X* = argmin_X sum_i ||(X - target_i) proxy_i^T||_F^2 / ||tau_i||_F^2 (:func:`optmerge_loss`),
    from X = sum_i tau_i by Adam (variant "full") or from X = mean_i tau_i by SGD
    with momentum 0.9 (variant "lora"), ``steps`` steps at ``lr``.  Each step's
    loss is appended to ``losses`` if given.  Returns X* ``(m, d)`` float32.
    """
    stacked = torch.stack(list(taus))
    init = stacked.sum(dim=0) if variant == "full" else stacked.mean(dim=0)
    k = _optmerge_rank(stacked.shape[1:], len(taus), rank_ratio)
    targets, proxies = optmerge_targets(taus, k, variant)
    norms2 = [float(tau.pow(2).sum()) for tau in taus]
    optimizer = "adam" if variant == "full" else "sgd"
    return minimise(lambda X: optmerge_loss(X, targets, proxies, norms2), init, optimizer, lr, steps, losses)
