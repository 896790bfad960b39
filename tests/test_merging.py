"""Merging algorithms against PEFT's merge_utils (an independent oracle) and hand-checked cases.

PEFT conventions (peft.utils.merge_utils): ``density`` = fraction kept with
``k = int(density * numel)`` (our ``keep``); ``ties`` elects the sign on the
unweighted trimmed sum with ties (sum == 0) going to +1 ("total"), applies the
weights afterwards and divides the disjoint sum by the COUNT of agreeing
entries (our ``by="count"``); it returns the merged task vector, so ours is
compared as ``theta - theta_0``.  With uniform weights the conventions match
and the comparison is exact; with non-uniform weights PEFT's sign election
ignores the weights while ours (like mergekit's) uses them.  PEFT draws DARE
masks from the global RNG with ``torch.bernoulli``, so DARE is compared by
statistics and by composing our own masks with PEFT's sign/disjoint steps.
"""

import inspect
import math

import pytest
import torch
from _merge_helpers import one_thread  # noqa: F401  (fixture)
from peft.utils import merge_utils as pm

from mckit.merge import kernels, registry
from mckit.merge import methods as M
from mckit.merge.objectives import optmerge_loss, optmerge_targets
from mckit.merge.thresholds import global_magnitude_thresholds, streamed_magnitude_threshold

pytestmark = pytest.mark.usefixtures("one_thread")


def _experts(n=3, shape=(24, 40), seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    thetas = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base, thetas


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ------------------------------------------------------------ linear methods
def test_average_is_mean_of_experts():
    base, thetas = _experts()
    expected = pm.task_arithmetic(thetas, torch.full((3,), 1 / 3))
    _close(M.average(base, thetas), expected)


@pytest.mark.parametrize("lam", [0.3, 1.0, 1.5])
def test_task_arithmetic_matches_peft(lam):
    base, thetas = _experts()
    taus = M.task_vectors(base, thetas)
    expected = base + pm.task_arithmetic(taus, torch.full((3,), lam))
    _close(M.task_arithmetic(base, thetas, lam=lam), expected)


def test_task_vectors_do_not_modify_inputs():
    base, thetas = _experts()
    copies = [t.clone() for t in thetas]
    M.ties(base, thetas, keep=0.3)
    M.task_arithmetic(base, thetas, lam=2.0)
    for a, b in zip(thetas, copies):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- TIES
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("keep", [0.1, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("shape", [(24, 40), (1000,)])
def test_ties_per_tensor_matches_peft_exactly(keep, shape):
    base, thetas = _experts(n=3, shape=shape, seed=1)
    taus = M.task_vectors(base, thetas)
    expected = pm.ties(taus, torch.ones(3), density=keep, majority_sign_method="total")
    got = M.ties(base, thetas, keep=keep, lam=1.0) - base
    _close(got, expected)


def test_ties_lambda_scales_merged_task_vector():
    base, thetas = _experts(seed=2)
    one = M.ties(base, thetas, keep=0.3, lam=1.0) - base
    _close(M.ties(base, thetas, keep=0.3, lam=0.5) - base, 0.5 * one)


def test_ties_steps_match_peft_primitives():
    base, thetas = _experts(seed=3)
    taus = M.task_vectors(base, thetas)
    trimmed = [M.trim(t, M.magnitude_threshold(t, 0.25)) for t in taus]
    for ours, tau in zip(trimmed, taus):
        _close(ours, pm.magnitude_based_pruning(tau, 0.25))
    stacked = torch.stack(trimmed)
    mask = pm.calculate_majority_sign_mask(stacked, method="total")
    gamma = M.elect_sign(trimmed)
    assert torch.equal((stacked.sign() == gamma) & (stacked != 0), mask & (stacked != 0))
    _close(M.disjoint_mean(trimmed, gamma, by="count"), pm.disjoint_merge(stacked, mask))


def test_ties_uniform_weights_by_weight_equals_by_count():
    base, thetas = _experts(seed=4)
    a = M.ties(base, thetas, keep=0.3, by="count")
    b = M.ties(base, thetas, keep=0.3, by="weight", weights=[1.0, 1.0, 1.0])
    _close(a, b)


def test_ties_weighted_matches_peft_when_signs_agree():
    # PEFT elects on the unweighted sum, we on the weighted one: identical when the
    # experts never disagree in sign, so use same-sign task vectors.
    base = torch.zeros(8, 8)
    g = torch.Generator().manual_seed(5)
    thetas = [torch.rand(8, 8, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, 1.0, 2.0])
    expected = pm.ties(thetas, w, density=0.5)
    _close(M.ties(base, thetas, keep=0.5, weights=w.tolist(), by="count"), expected)
    # mergekit "normalize": divide by the sum of agreeing weights instead of their count
    trimmed = [M.trim(t, M.magnitude_threshold(t, 0.5)) for t in thetas]
    agree = torch.stack([(t > 0).float() for t in trimmed])
    num = sum(wi * t for wi, t in zip(w, trimmed))
    den = (w[:, None, None] * agree).sum(0)
    den[den == 0] = 1
    _close(M.ties(base, thetas, keep=0.5, weights=w.tolist(), by="weight"), num / den)


def test_ties_hand_case():
    base = torch.zeros(4)
    thetas = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([1.0, 2.0, -4.0, -2.0])]
    # keep 0.5: expert 0 keeps 3 and -2, expert 1 keeps 2 and -4 (k = 2 of 4)
    # sums: [3, 2, -4, -2] -> signs + + - -; disjoint means: 3, 2, -4, -2
    _close(M.ties(base, thetas, keep=0.5), torch.tensor([3.0, 2.0, -4.0, -2.0]))
    # keep 1: sums [4, 1, -3.5, -4]; entry 1: only +2 agrees; entry 2: only -4
    _close(M.ties(base, thetas, keep=1.0), torch.tensor([2.0, 2.0, -4.0, -2.0]))


def test_global_threshold_equals_kthvalue_of_concatenation():
    g = torch.Generator().manual_seed(6)
    base = {"a": torch.randn(50, 30, generator=g), "b": torch.randn(200, generator=g),
            "c": torch.randn(7, 9, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) * s for k, v in base.items()}
               for s in (0.01, 0.1)]
    for keep in (0.05, 0.2, 0.77, 1.0):
        thresholds = global_magnitude_thresholds(base, experts, keep)
        for sd, thr in zip(experts, thresholds):
            mags = torch.cat([(sd[k] - base[k]).abs().reshape(-1) for k in base])
            k = int(keep * mags.numel())
            assert thr == float(torch.kthvalue(mags, mags.numel() - k + 1).values)
            assert int((mags >= thr).sum()) == k


def test_streamed_threshold_handles_tiny_keep_and_zeros():
    x = torch.zeros(100)
    x[3] = -5.0
    assert streamed_magnitude_threshold(lambda: [x], 0.01) == 5.0
    assert streamed_magnitude_threshold(lambda: [x], 0.005) == math.inf
    assert streamed_magnitude_threshold(lambda: [x], 1.0) == 0.0


def test_ties_with_global_thresholds_trims_across_tensors():
    base = {"a": torch.zeros(10), "b": torch.zeros(10)}
    expert = {"a": torch.arange(1.0, 11.0), "b": torch.arange(1.0, 11.0) * 100}
    (thr,) = global_magnitude_thresholds(base, [expert], keep=0.5)
    assert thr == 100.0                     # all of "b" survives, none of "a"
    a = M.ties(base["a"], [expert["a"]], thresholds=[thr])
    b = M.ties(base["b"], [expert["b"]], thresholds=[thr])
    assert torch.count_nonzero(a) == 0 and torch.equal(b, expert["b"])


# ---------------------------------------------------------------------- DARE
def test_dare_statistics_kept_fraction_and_unbiased():
    tau = torch.full((400, 500), 0.25)
    g = torch.Generator().manual_seed(7)
    for drop in (0.2, 0.5, 0.9):
        out = M.dare_drop(tau, drop, g)
        kept = (out != 0).float().mean().item()
        assert abs(kept - (1 - drop)) < 0.01
        assert abs(out.mean().item() - 0.25) < 0.01
        assert torch.allclose(out[out != 0], torch.tensor(0.25 / (1 - drop)))
    # same statistics as PEFT's random pruning (density = 1 - drop)
    torch.manual_seed(0)
    ref = pm.prune(tau, 0.8, method="random", rescale=True)
    assert abs((ref != 0).float().mean().item() - 0.8) < 0.01
    assert abs(ref.mean().item() - out.new_tensor(0.25).item()) < 0.01


def test_dare_ta_seeded_and_composes_with_task_arithmetic():
    base, thetas = _experts(seed=8)
    a = M.dare_ta(base, thetas, drop=0.3, seed=11)
    assert torch.equal(a, M.dare_ta(base, thetas, drop=0.3, seed=11))
    assert not torch.equal(a, M.dare_ta(base, thetas, drop=0.3, seed=12))
    dropped = [M.dare_drop(t, 0.3, torch.Generator().manual_seed(11 + i))
               for i, t in enumerate(M.task_vectors(base, thetas))]
    _close(a, base + pm.task_arithmetic(dropped, torch.ones(3)))


def test_dare_ties_composes_with_peft_sign_and_disjoint_merge():
    base, thetas = _experts(seed=9)
    dropped = torch.stack([M.dare_drop(t, 0.4, torch.Generator().manual_seed(3 + i))
                           for i, t in enumerate(M.task_vectors(base, thetas))])
    mask = pm.calculate_majority_sign_mask(dropped, method="total")
    expected = base + pm.disjoint_merge(dropped, mask)
    _close(M.dare_ties(base, thetas, drop=0.4, seed=3), expected)
    # with a magnitude trim on top: TIES on the DARE-processed task vectors
    trimmed = torch.stack([pm.magnitude_based_pruning(t, 0.5) for t in dropped])
    mask = pm.calculate_majority_sign_mask(trimmed, method="total")
    _close(M.dare_ties(base, thetas, drop=0.4, keep=0.5, seed=3), base + pm.disjoint_merge(trimmed, mask))


# ------------------------------------------------------------ SVD methods
def _orthogonal_experts(shape=(6, 5)):
    """Two task vectors on disjoint singular directions (rows and columns)."""
    base = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    t1 = torch.zeros(shape)
    t1[0, 0], t1[1, 1] = 3.0, -2.0
    t2 = torch.zeros(shape)
    t2[2, 3], t2[4, 2] = 1.5, 0.5
    return base, [base + t1, base + t2], t1 + t2


def test_tsv_orthogonal_task_vectors_is_their_sum():
    base, thetas, total = _orthogonal_experts()
    _close(M.tsv(base, thetas) - base, total, atol=1e-5)


def test_tsv_single_expert_returns_it():
    base, thetas = _experts(n=1, shape=(7, 9))
    _close(M.tsv(base, thetas), thetas[0], atol=1e-5)


def test_tsv_truncates_to_rank_per_task_and_orthogonalises():
    base, thetas = _experts(n=2, shape=(8, 8), seed=11)
    tau = M.tsv(base, thetas, lam=1.0) - base
    # r = 4 components per task, 8 in total: full rank here; singular values = the kept S_i
    kept = torch.cat([torch.linalg.svdvals(t)[:4] for t in M.task_vectors(base, thetas)])
    _close(torch.linalg.svdvals(tau), kept.sort(descending=True).values, atol=1e-4)


def test_iso_c_flattens_spectrum():
    base = torch.zeros(3, 2)
    theta = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    _close(M.iso_c(base, [theta]), torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    b, thetas = _experts(n=3, shape=(10, 6), seed=12)
    tau = M.iso_c(b, thetas, lam=0.5) - b
    s = torch.linalg.svdvals(tau)
    total = sum(M.task_vectors(b, thetas))
    _close(s, torch.full_like(s, 0.5 * torch.linalg.svdvals(total).mean().item()), atol=1e-5)


def test_svd_methods_fall_back_to_task_arithmetic_on_vectors():
    base, thetas = _experts(shape=(12,))
    ta = M.task_arithmetic(base, thetas, lam=0.7)
    for name in ("tsv", "iso_c", "wudi", "optmerge"):
        _close(registry.get(name).fn(base, thetas, lam=0.7), ta)
    mean = base + 0.7 * torch.stack(M.task_vectors(base, thetas)).mean(0)
    _close(M.optmerge_lora(base, thetas, lam=0.7), mean)


# ----------------------------------------------- optimisation-based methods
def test_wudi_loss_decreases_and_orthogonal_optimum_stays():
    base, thetas = _experts(seed=13, shape=(16, 12))
    losses = []
    M.wudi(base, thetas, lr=1e-3, steps=200, losses=losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses[:50], losses[1:51]))
    base, thetas, total = _orthogonal_experts()
    losses = []
    _close(M.wudi(base, thetas, steps=20, losses=losses) - base, total)
    assert max(losses) < 1e-10


def test_wudi_converges_to_closed_form():
    # gradient zero: X sum_i G_i = sum_i tau_i G_i with G_i = tau_i^T tau_i / ||tau_i||^2
    base, thetas = _experts(n=2, seed=14, shape=(6, 4))
    taus = M.task_vectors(base, thetas)
    G = [t.T @ t / t.pow(2).sum() for t in taus]
    X_star = sum(t @ g for t, g in zip(taus, G)) @ torch.linalg.inv(sum(G))
    X = M.wudi(base, thetas, lr=3e-3, steps=3000) - base
    _close(X, X_star, atol=2e-4)
    assert M.wudi_loss(X_star, taus) <= M.wudi_loss(sum(taus), taus)


def test_wudi_default_schedule_is_adam_1e5_300():
    base, thetas = _experts(seed=15, shape=(5, 5))
    losses = []
    out = M.wudi(base, thetas, losses=losses)
    assert len(losses) == 300
    # Adam moves each entry by at most about lr per step
    start = base + sum(M.task_vectors(base, thetas))
    assert (out - start).abs().max() <= 300 * 1e-5 * 1.01


def test_optmerge_single_expert_is_fixed_point():
    base, thetas = _experts(n=1, shape=(6, 8), seed=16)
    losses = []
    _close(M.optmerge(base, thetas, lr=1e-3, steps=30, losses=losses), thetas[0], atol=1e-5)
    assert max(losses) < 1e-8


def test_optmerge_targets_by_hand():
    taus = [torch.diag(torch.tensor([4.0, 1.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0, 3.0]))]
    targets, proxies = optmerge_targets(taus, k=1, variant="lora")
    _close(targets[0], torch.diag(torch.tensor([4.0, 0.0, 0.0])))
    _close(proxies[1].abs(), torch.tensor([[0.0, 0.0, 3.0]]))
    targets, _ = optmerge_targets(taus, k=1, variant="full")
    mean = torch.diag(torch.tensor([2.0, 1.5, 1.5]))
    # tau_0 - mean = diag(2, -0.5, -1.5): rank-1 keeps the 2
    _close(targets[0], torch.diag(torch.tensor([2.0, 0.0, 0.0])) + mean)


def test_optmerge_loss_decreases_full_and_lora():
    base, thetas = _experts(n=3, seed=17, shape=(12, 9))
    for fn, lr in ((M.optmerge, 1e-3), (M.optmerge_lora, 1e-2)):
        losses = []
        fn(base, thetas, lr=lr, steps=60, losses=losses)
        assert losses[-1] < losses[0]


def test_optmerge_lora_starts_at_mean_and_full_at_sum():
    base, thetas = _experts(n=3, seed=18, shape=(9, 7))
    taus = M.task_vectors(base, thetas)
    _close(M.optmerge_lora(base, thetas, steps=0), base + torch.stack(taus).mean(0))
    _close(M.optmerge(base, thetas, steps=0), base + torch.stack(taus).sum(0))
    losses = []
    M.optmerge_lora(base, thetas, steps=1, losses=losses)
    targets, proxies = optmerge_targets(taus, k=7 // 3, variant="lora")
    norms = [float(t.pow(2).sum()) for t in taus]
    assert losses[0] == pytest.approx(float(optmerge_loss(torch.stack(taus).mean(0), targets, proxies, norms)))


def test_optmerge_rank_ratio():
    base, thetas = _experts(n=2, seed=19, shape=(10, 10))
    a = M.optmerge(base, thetas, lr=1e-3, steps=5, rank_ratio=0.1)
    b = M.optmerge(base, thetas, lr=1e-3, steps=5, rank_ratio=0.5)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="rank_ratio"):
        M.optmerge(base, thetas, rank_ratio=1.5)


# ---------------------------------------------------------------------- LoRA
def test_lora_delta_is_product_and_differs_from_factor_average():
    g = torch.Generator().manual_seed(20)
    A = [torch.randn(2, 6, generator=g) for _ in range(2)]
    B = [torch.randn(5, 2, generator=g) for _ in range(2)]
    deltas = [M.lora_delta(a, b, 0.5) for a, b in zip(A, B)]
    _close(deltas[0], B[0] @ A[0] * 0.5)
    wrong = M.lora_delta((A[0] + A[1]) / 2, (B[0] + B[1]) / 2, 0.5)
    assert not torch.allclose(wrong, (deltas[0] + deltas[1]) / 2)
    with pytest.raises(ValueError, match="LoRA shapes"):
        M.lora_delta(A[0], B[0].T)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_keep_out_of_range(keep):
    base, thetas = _experts()
    with pytest.raises(ValueError, match="keep"):
        M.ties(base, thetas, keep=keep)


@pytest.mark.parametrize("drop", [-0.1, 1.0, 2.0])
def test_drop_out_of_range(drop):
    base, thetas = _experts()
    with pytest.raises(ValueError, match="drop"):
        M.dare_ta(base, thetas, drop=drop)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_tensor(bad):
    base, thetas = _experts()
    thetas[1] = thetas[1].clone()
    thetas[1][3, 4] = bad
    for name in registry.METHODS:
        with pytest.raises(ValueError, match=r"thetas\[1\]"):
            registry.get(name).fn(base, thetas)
    with pytest.raises(ValueError, match="theta_0"):
        M.average(thetas[1], [base])


def test_shape_mismatch_and_unknown_method():
    base, thetas = _experts()
    with pytest.raises(ValueError, match=r"thetas\[2\] has shape"):
        M.task_arithmetic(base, thetas[:2] + [thetas[2][:, :3]])
    with pytest.raises(ValueError, match="average, task_arithmetic, ties"):
        registry.get("magic")
    with pytest.raises(ValueError, match="by must be"):
        M.ties(base, thetas, by="mean")


def test_registry_matches_signatures_and_defaults():
    """Every registered option is a keyword of the function, with the same default; nothing else is."""
    internal = {"theta_0", "thetas", "thresholds", "losses"}
    for name, method in registry.METHODS.items():
        params = inspect.signature(method.fn).parameters
        assert set(method.defaults()) == set(params) - internal, name
        for option, default in method.defaults().items():
            assert params[option].default == default, (name, option)


def test_registry_checks_options():
    assert registry.get("ties").resolve({"keep": 0.5}) == {"keep": 0.5, "lam": 1.0, "by": "count", "weights": None}
    for method, options, message in [("ties", {"keep": 0}, "keep must be in"), ("dare_ta", {"drop": 1.0}, "drop must"),
                                     ("average", {"lam": 2}, "do not apply to method average"),
                                     ("wudi", {"steps": -1}, "steps must be"), ("task_arithmetic", {"lam": math.nan},
                                                                                "lam must be a finite")]:
        with pytest.raises(ValueError, match=message):
            registry.get(method).resolve(options)
    assert registry.for_regime("optmerge", "lora").name == "optmerge_lora"
    assert registry.for_regime("optmerge", "full").name == "optmerge"
    assert registry.for_regime("ties", "lora").name == "ties"


@pytest.mark.parametrize("method,options", [("ties", {"keep": 0.3}), ("dare_ties", {"drop": 0.3, "keep": 0.6}),
                                            ("ties", {"keep": 0.5, "by": "weight", "weights": [0.5, 1.0, 2.0]})])
def test_fast_ties_kernel_equals_readable_function(method, options):
    """The engine's in-place TIES equals trim -> elect -> disjoint mean (DARE seeded per tensor name)."""
    base, thetas = _experts()
    fast = kernels.merge_tensor(method, "layers.0.w", base, thetas, options)
    if method == "dare_ties":
        options = {**options, "seed": registry.tensor_seed(0, "layers.0.w")}
    readable = registry.get(method).fn(base, thetas, **options)
    torch.testing.assert_close(fast, readable, atol=1e-6, rtol=0)
