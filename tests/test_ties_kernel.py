"""TIES streamed block by block in numpy, checked against the in-memory torch TIES."""

import numpy as np
import pytest
import torch
from _merge_helpers import load_checkpoint, tiny_config
from safetensors.torch import save_file

from mckit.merge import engine as E
from mckit.merge import kernels
from mckit.merge import ties_kernel as K
from mckit.merge.thresholds import kth_largest
from mckit.storage.tensorfiles import BlockReader, Checkpoint

BIG = "model.layers.0.mlp.down_proj.weight"          # 1100 x 1000: larger than the sample, so bracketed
SMALL = "model.layers.0.self_attn.q_proj.weight"


def _save(state: dict, path):
    path.mkdir(parents=True)
    tiny_config(64).save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _states(dtype=torch.float32, layout="random"):
    """A base and three experts; ``layout="hidden"``: large changes only where the sample does not look."""
    g = torch.Generator().manual_seed(0)
    base = {BIG: torch.randn(1100, 1000, generator=g), SMALL: torch.randn(64, 64, generator=g)}
    experts = []
    for i in range(3):
        expert = {n: t + 0.01 * torch.randn(t.shape, generator=g) * (i + 1) for n, t in base.items()}
        if layout == "hidden":
            flat = expert[BIG].view(-1)
            sampled = torch.zeros(flat.numel(), dtype=torch.bool)
            starts = np.linspace(0, flat.numel() - K.CHUNK, K.SAMPLE_CHUNKS).astype(np.int64)
            for s in starts:
                sampled[s:s + K.CHUNK] = True
            flat[~sampled] += torch.randn(int((~sampled).sum()), generator=g)
        experts.append(expert)
    cast = lambda sd: {n: t.to(dtype) for n, t in sd.items()}   # noqa: E731
    return cast(base), [cast(e) for e in experts]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    out = {}
    for label, dtype, layout in [("f32", torch.float32, "random"), ("bf16", torch.bfloat16, "random"),
                                 ("hidden", torch.float32, "hidden")]:
        base, experts = _states(dtype, layout)
        out[label] = (_save(base, root / label / "base"),
                      [_save(e, root / label / f"e{i}") for i, e in enumerate(experts)], base, experts)
    return out


@pytest.mark.parametrize("label", ["f32", "bf16", "hidden"])
@pytest.mark.parametrize("options", [{"keep": 0.2}, {"keep": 0.9, "lam": 0.7}, {"keep": 1.0},
                                     {"keep": 0.3, "by": "weight", "weights": [0.5, 1.0, 2.0]}])
def test_streamed_ties_equals_in_memory(folders, tmp_path, label, options):
    base_dir, expert_dirs, base, experts = folders[label]
    out = E.merge_checkpoints("ties", base_dir, expert_dirs, tmp_path / "out", progress=False, **options)
    got = load_checkpoint(out)
    want = E.merge_state_dict("ties", base, experts, **options)
    for name in (BIG, SMALL):
        assert got[name].dtype == base[name].dtype
        if "weights" in options:      # torch fuses w * t into its additions: last-bit differences
            assert torch.allclose(got[name].float(), want[name].float(), rtol=0, atol=1e-6), name
        else:
            assert torch.equal(got[name], want[name]), (name, (got[name].float() - want[name].float()).abs().max())


def test_thresholds_are_exact_from_the_bracket_or_from_the_whole_tensor(folders, monkeypatch):
    """Random changes: the sample's bracket holds every k-th value (no whole-tensor pass); changes hidden from
    the sample: the count shows the bracket missed and the whole |tau_i| gives the threshold. Exact both ways."""
    whole = []
    original = K._whole
    monkeypatch.setattr(K, "_whole", lambda *a: whole.append(a[3]) or original(*a))
    for label, missed in [("f32", []), ("hidden", [0, 1, 2])]:
        base_dir, expert_dirs, base, experts = folders[label]
        whole.clear()
        b, es = Checkpoint(base_dir), [Checkpoint(d) for d in expert_dirs]
        with BlockReader([b.file_of(BIG)] + [e.file_of(BIG) for e in es]) as reader:
            got = K.tensor_thresholds(reader, b, es, BIG, 0.2)
        want = [kth_largest((e[BIG].float() - base[BIG].float()).abs(), 0.2) for e in experts]
        assert got == want and whole == missed


def test_bracket_holds_the_quantile_of_its_sample():
    rng = np.random.default_rng(1)
    sample = np.abs(rng.standard_normal(100_000)).astype(np.float32)
    lo, hi = K.bracket(sample, 0.2)
    q = np.quantile(sample, 0.8)
    assert lo < q < hi and 0.75 < (sample < lo).mean() < 0.8 < (sample <= hi).mean() < 0.85
    assert K.bracket(sample, 1.0)[0] == -np.inf


@pytest.mark.parametrize("by, weights", [("count", [1.0, 1.0, 1.0]), ("weight", [0.2, 1.5, 1.0])])
def test_ties_block_equals_ties_inplace(by, weights):
    g = torch.Generator().manual_seed(3)
    theta_0 = torch.randn(5000, generator=g)
    thetas = [theta_0 + torch.randn(5000, generator=g) * 0.1 for _ in range(3)]
    taus = [t - theta_0 for t in thetas]
    thresholds = [kth_largest(t.abs(), 0.4) for t in taus]
    want = kernels.ties_inplace([t.clone() for t in taus], 0.4, thresholds, weights, by).mul_(0.8).add_(theta_0)
    out = np.empty(5000, np.float32)
    K.ties_block(theta_0.numpy(), [t.numpy() for t in thetas], thresholds, weights, by, 0.8, out,
                 K.TiesWork(3, 5000))
    if by == "count":
        assert np.array_equal(out, want.numpy())
    assert np.allclose(out, want.numpy(), rtol=0, atol=1e-6)


def test_threshold_edges():
    values = np.array([3.0, 1.0, 2.0, 2.0], np.float32)
    assert K.kth_largest(values, 0) == np.inf and K.kth_largest(values, 4) == 0.0 and K.kth_largest(values, 2) == 2.0
    assert K.threshold_in_bracket(3, 1, [np.array([2.0, 1.5], np.float32)]) == 1.5
    assert K.threshold_in_bracket(5, 1, [np.array([2.0, 1.5], np.float32)]) is None      # below the bracket
    assert K.threshold_in_bracket(1, 1, [np.array([2.0], np.float32)]) is None           # above it
