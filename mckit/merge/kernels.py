"""The engine's per-tensor merge in torch: one entry point, and TIES rewritten in place and threaded.

:func:`merge_tensor` is how every caller merges one named tensor (the engine,
in-memory state dicts, composition): it fills in the registry's defaults,
seeds DARE per tensor name (:func:`mckit.merge.registry.tensor_seed`), and
runs TIES and DARE-TIES through :func:`ties_inplace`, which gives the same
numbers as :func:`mckit.merge.methods.ties_merge` (tests check it) with no
per-expert temporaries and the experts' top-k thresholds computed side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from mckit.merge import methods
from mckit.merge.registry import get, tensor_seed
from mckit.merge.thresholds import kth_largest, streamed_magnitude_threshold

#: Methods whose merge runs through :func:`ties_inplace` (and accept global thresholds).
TIES_FAMILY = ("ties", "dare_ties")


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


def trim_inplace(tau: Tensor, keep: float, threshold: float | None) -> Tensor:
    """``trim(tau, threshold or magnitude_threshold(tau, keep))`` in place on an owned tensor, ``|tau|`` computed once."""
    magnitudes = tau.abs()
    if threshold is None:
        threshold = kth_largest(magnitudes, keep)
    return tau.mul_(magnitudes.ge_(threshold))             # ge_ leaves 1.0 / 0.0 in place


def elect_sign_inplace(trimmed: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    """:func:`mckit.merge.methods.elect_sign` with one accumulator."""
    total = torch.mul(trimmed[0], w[0])
    for w_i, t in zip(w[1:], trimmed[1:]):
        total.add_(t, alpha=w_i)
    return total.ge_(0).mul_(2).sub_(1)                    # 1 if sum >= 0 else -1, in place


def disjoint_mean_inplace(trimmed: Sequence[Tensor], gamma: Tensor, w: Sequence[float], by: str) -> Tensor:
    """:func:`mckit.merge.methods.disjoint_mean` with three buffers whatever the number of experts."""
    numerator = torch.zeros_like(gamma)                    # sum_i w_i |trimmed_i| agree_i
    denominator = torch.zeros_like(gamma)
    aligned = torch.empty_like(gamma)
    for w_i, t in zip(w, trimmed):
        torch.mul(t, gamma, out=aligned).clamp_(min=0)     # |t| where t agrees with gamma, else 0
        numerator.add_(aligned, alpha=w_i)
        denominator.add_(aligned.sign_(), alpha=1.0 if by == "count" else w_i)   # agree_i as 0/1
    denominator.masked_fill_(denominator == 0, 1.0)
    return numerator.mul_(gamma).div_(denominator)


def ties_inplace(taus: list[Tensor], keep: float, thresholds: Sequence[float] | None,
                 weights: Sequence[float] | None, by: str) -> Tensor:
    """The merged TIES task vector of owned ``taus`` (trimmed in place): equal to ``methods.ties_merge``."""
    if thresholds is None:
        thresholds = [None] * len(taus)
    elif len(thresholds) != len(taus):
        raise ValueError(f"thresholds has {len(thresholds)} entries for {len(taus)} experts")
    if by not in ("count", "weight"):
        raise ValueError(f"by must be 'count' or 'weight', got {by!r}")
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]
    trimmed = _map_experts(lambda tau, thr: trim_inplace(tau, keep, thr), taus, thresholds)
    return disjoint_mean_inplace(trimmed, elect_sign_inplace(trimmed, w), w, by)


def merge_tensor(method: str, name: str, theta_0: Tensor, thetas: Sequence[Tensor], options: dict | None = None,
                 thresholds: Sequence[float] | None = None) -> Tensor:
    """theta for tensor ``name``: ``method`` with the registry's defaults overridden by ``options`` (float32).

    ``options["seed"]`` (DARE) becomes ``tensor_seed(seed, name)``, so a tensor's
    masks depend only on the seed and its name, in memory as in a streamed merge.
    ``thresholds``: per-expert global magnitudes (TIES with a whole-model top-k).
    """
    spec = get(method)
    kwargs = spec.resolve(options or {})
    if spec.seeded:
        kwargs["seed"] = tensor_seed(kwargs["seed"], name)
    if method not in TIES_FAMILY:
        if thresholds is not None:
            raise ValueError(f"thresholds apply to ties and dare_ties, not {method}")
        return spec.fn(theta_0, thetas, **kwargs)
    methods.check_inputs(theta_0, thetas)
    taus = (methods.task_vectors(theta_0, thetas) if method == "ties"
            else methods.dare_taus(theta_0, thetas, kwargs["drop"], kwargs["seed"]))
    merged = ties_inplace(taus, kwargs["keep"], thresholds, kwargs["weights"], kwargs["by"])
    return merged.mul_(kwargs["lam"]).add_(theta_0.float())


def global_thresholds(method: str, names: Sequence[str], base_tensor: Callable[[str], Tensor],
                      expert_tensor: Callable[[int, str], Tensor], n_experts: int, options: dict) -> list[float]:
    """Per-expert exact magnitude threshold of TIES's trim over every tensor of ``names`` at once (global top-k).

    Expert i's task vectors (DARE'd first for ``dare_ties``, with the masks
    :func:`merge_tensor` will draw) are streamed twice through
    :func:`mckit.merge.thresholds.streamed_magnitude_threshold`: memory stays at one tensor.
    """
    kwargs = get(method).resolve(options)

    def stream(i: int):
        for name in names:
            tau = expert_tensor(i, name).float() - base_tensor(name).float()
            if method == "dare_ties":
                generator = torch.Generator().manual_seed(tensor_seed(kwargs["seed"], name) + i)
                tau = methods.dare_drop(tau, kwargs["drop"], generator)
            yield tau

    return [streamed_magnitude_threshold(lambda i=i: stream(i), kwargs["keep"]) for i in range(n_experts)]
