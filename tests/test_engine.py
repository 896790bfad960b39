"""Streaming merge engine on tiny Llama checkpoints, checked against the in-memory pure functions."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from _merge_helpers import (
    fine_tuned,
    load_checkpoint,
    one_thread,  # noqa: F401  (fixture)
    save_checkpoint,
    tiny_base,
    tree_snapshot,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mckit.merge import engine as E
from mckit.merge import kernels
from mckit.merge import methods as M
from mckit.merge.registry import get, tensor_seed
from mckit.merge.thresholds import global_magnitude_thresholds
from mckit.storage import tensorfiles as T

LINEAR = re.compile(E.DEFAULT_INCLUDE)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Sharded base, a single-file expert, a sharded expert and another single-file expert."""
    root = tmp_path_factory.mktemp("ckpts")
    base = tiny_base(seed=0)
    experts = [fine_tuned(base, seed=i) for i in range(3)]
    base_dir = save_checkpoint(base, root / "base", sharded=True)
    (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    dirs = [save_checkpoint(sd, root / f"expert{i}", sharded=(i == 1)) for i, sd in enumerate(experts)]
    return {"root": root, "base": base_dir, "experts": dirs, "base_sd": base, "expert_sds": experts}


def _expected(method, ckpts, include=E.DEFAULT_INCLUDE, thresholds=None, seed=0, **options):
    """Reference: the pure function of mckit.merge.methods applied name by name in memory."""
    base, experts = ckpts["base_sd"], ckpts["expert_sds"]
    fn = get(method).fn
    out = {}
    for name, theta_0 in base.items():
        if not re.fullmatch(include, name):
            out[name] = theta_0
            continue
        kwargs = dict(options)
        if method in ("dare_ta", "dare_ties"):
            kwargs["seed"] = tensor_seed(seed, name)
        if thresholds is not None:
            kwargs["thresholds"] = thresholds
        out[name] = fn(theta_0, [e[name] for e in experts], **kwargs)
    return out


def _assert_state_equal(got, expected, atol=1e-6):
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("method, options", [
    ("average", {}),
    ("task_arithmetic", {"lam": 0.7}),
    ("ties", {"keep": 0.2, "lam": 1.0}),
    ("ties", {"keep": 0.5, "by": "weight", "weights": [0.5, 1.0, 2.0]}),
    ("dare_ta", {"drop": 0.3, "lam": 0.5}),
    ("dare_ties", {"drop": 0.2, "keep": 0.6}),
    ("tsv", {"lam": 0.5}),
    ("iso_c", {"lam": 0.3}),
    ("wudi", {"steps": 3, "lr": 1e-4}),
    ("optmerge", {"steps": 3, "lr": 1e-4}),
    ("optmerge_lora", {"steps": 3}),
])
def test_streamed_merge_equals_in_memory(ckpts, tmp_path, method, options):
    out = E.merge_checkpoints(method, ckpts["base"], ckpts["experts"], tmp_path / "out", seed=5,
                              progress=False, **options)
    got = load_checkpoint(out)
    _assert_state_equal(got, _expected(method, ckpts, seed=5, **options))
    changed = [n for n in got if not torch.equal(got[n], ckpts["base_sd"][n])]
    assert changed and all(LINEAR.fullmatch(n) for n in changed)     # only linear weights merged


def test_in_memory_merge_state_dict_matches_engine(ckpts, tmp_path):
    out = E.merge_checkpoints("dare_ties", ckpts["base"], ckpts["experts"], tmp_path / "out", seed=2,
                              progress=False, keep=0.5, scope="global")
    mem = E.merge_state_dict("dare_ties", ckpts["base_sd"], ckpts["expert_sds"], seed=2, keep=0.5,
                             scope="global")
    _assert_state_equal(load_checkpoint(out), mem)


def test_global_ties_uses_model_wide_threshold(ckpts, tmp_path):
    base, experts = ckpts["base_sd"], ckpts["expert_sds"]
    names = [n for n in base if LINEAR.fullmatch(n)]
    thresholds = global_magnitude_thresholds(base, experts, 0.2, names)
    out = E.merge_checkpoints("ties", ckpts["base"], ckpts["experts"], tmp_path / "g", keep=0.2,
                              scope="global", progress=False)
    got = load_checkpoint(out)
    _assert_state_equal(got, _expected("ties", ckpts, keep=0.2, thresholds=thresholds))
    per_tensor = _expected("ties", ckpts, keep=0.2)
    assert any(not torch.allclose(got[n], per_tensor[n]) for n in names)


def test_output_loads_in_transformers_and_copies_side_files(ckpts, tmp_path):
    out = E.merge_checkpoints("ties", ckpts["base"], ckpts["experts"], tmp_path / "out", keep=0.3,
                              max_shard_bytes=40_000, progress=False)
    index = json.loads((out / E.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").read_text() == (ckpts["base"] / "config.json").read_text()
    assert (out / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    expected = _expected("ties", ckpts, keep=0.3)
    for name in expected:
        torch.testing.assert_close(state[name], expected[name].float(), atol=1e-6, rtol=1e-5)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_single_shard_output_and_include_everything(ckpts, tmp_path):
    out = E.merge_checkpoints("average", ckpts["base"], ckpts["experts"], tmp_path / "out", include=".*",
                              progress=False)
    assert (out / "model.safetensors").is_file() and not (out / E.INDEX_FILE).exists()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    got = load_checkpoint(out)
    _assert_state_equal(got, _expected("average", ckpts, include=".*"))
    assert not torch.equal(got["model.embed_tokens.weight"], ckpts["base_sd"]["model.embed_tokens.weight"])


def test_bfloat16_base_keeps_dtype(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in tiny_base(seed=3).items()}
    experts = [{k: v.to(torch.bfloat16) for k, v in fine_tuned(base, i).items()} for i in range(2)]
    b = save_checkpoint(base, tmp_path / "b")
    es = [save_checkpoint(e, tmp_path / f"e{i}") for i, e in enumerate(experts)]
    got = load_checkpoint(E.merge_checkpoints("ties", b, es, tmp_path / "out", keep=0.4, progress=False))
    for name, theta_0 in base.items():
        assert got[name].dtype == torch.bfloat16
        ref = M.ties(theta_0, [e[name] for e in experts], keep=0.4) if LINEAR.fullmatch(name) else theta_0
        assert torch.equal(got[name], ref.to(torch.bfloat16))


def test_inputs_untouched_and_overwrite(ckpts, tmp_path):
    before = [tree_snapshot(p) for p in [ckpts["base"], *ckpts["experts"]]]
    out = tmp_path / "out"
    E.merge_checkpoints("ties", ckpts["base"], ckpts["experts"], out, progress=False)
    with pytest.raises(E.MergeError, match="exists"):
        E.merge_checkpoints("average", ckpts["base"], ckpts["experts"], out, progress=False)
    E.merge_checkpoints("average", ckpts["base"], ckpts["experts"], out, overwrite=True, progress=False)
    _assert_state_equal(load_checkpoint(out), _expected("average", ckpts))
    assert _leftovers(tmp_path) == []
    assert before == [tree_snapshot(p) for p in [ckpts["base"], *ckpts["experts"]]]


# ------------------------------------------------------------- atomicity
def _nan_expert(ckpts, tmp_path, name="model.layers.1.mlp.down_proj.weight", value=float("nan")):
    sd = {k: v.clone() for k, v in ckpts["expert_sds"][2].items()}
    sd[name][0, 0] = value
    return save_checkpoint(sd, tmp_path / "bad")


@pytest.mark.parametrize("method", ["average", "ties", "task_arithmetic"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nan_midway_names_tensor_and_leaves_nothing(ckpts, tmp_path, method, value):
    bad = _nan_expert(ckpts, tmp_path, value=value)
    out = tmp_path / "out"
    with pytest.raises(E.MergeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight in .*bad/model\.safetensors"):
        E.merge_checkpoints(method, ckpts["base"], ckpts["experts"][:2] + [bad], out, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failure_midway_keeps_previous_output(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    E.merge_checkpoints("average", ckpts["base"], ckpts["experts"], out, progress=False)
    before = tree_snapshot(out)
    calls = {"n": 0}
    original = E.merge_array

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(E, "merge_array", failing)
    with pytest.raises(KeyboardInterrupt):
        E.merge_checkpoints("dare_ties", ckpts["base"], ckpts["experts"], out, overwrite=True, progress=False)
    assert calls["n"] == 5
    assert tree_snapshot(out) == before and _leftovers(tmp_path) == []
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        E.merge_checkpoints("dare_ties", ckpts["base"], ckpts["experts"], tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------- bad input
def _bad_case(ckpts, tmp_path, case):
    """Returns (kwargs for merge_checkpoints, regex the error must match)."""
    base, experts = ckpts["base"], list(ckpts["experts"])
    kwargs = {"method": "ties", "base": base, "experts": experts}
    if case == "shape":
        sd = dict(ckpts["expert_sds"][0])
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 31)
        kwargs["experts"] = [save_checkpoint(sd, tmp_path / "shape"), *experts[1:]]
        return kwargs, r"q_proj\.weight has shape \(32, 31\) in .*shape/model\.safetensors but \(32, 32\)"
    if case == "missing":
        sd = dict(ckpts["expert_sds"][0])
        del sd["model.layers.1.mlp.up_proj.weight"]
        kwargs["experts"] = [save_checkpoint(sd, tmp_path / "missing"), *experts[1:]]
        return kwargs, r"model\.layers\.1\.mlp\.up_proj\.weight is missing in expert .*missing"
    if case == "vocab":
        sd = fine_tuned(tiny_base(seed=0, vocab_size=80), seed=1)
        kwargs["experts"] = [save_checkpoint(sd, tmp_path / "vocab", vocab_size=80), *experts[1:]]
        return kwargs, r"different vocab sizes: .* 64, .*vocab has 80"
    if case == "no_dir":
        kwargs["experts"] = [tmp_path / "nowhere"]
        return kwargs, r"checkpoint directory not found: .*nowhere"
    if case == "no_weights":
        (tmp_path / "empty").mkdir()
        kwargs["base"] = tmp_path / "empty"
        return kwargs, r"no model\.safetensors or model\.safetensors\.index\.json in .*empty"
    if case == "keep":
        return {**kwargs, "keep": 0.0}, r"keep must be in \(0, 1\]"
    if case == "drop":
        return {**kwargs, "method": "dare_ta", "drop": 1.0}, r"drop must be in \[0, 1\)"
    if case == "method":
        return {**kwargs, "method": "soup"}, r"unknown merge method 'soup'; valid: average, task_arithmetic"
    if case == "option":
        return {**kwargs, "method": "average", "keep": 0.5}, r"keep do not apply to method average"
    if case == "scope":
        return {**kwargs, "method": "tsv", "scope": "global"}, r"scope='global' applies to ties, dare_ties"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["shape", "missing", "vocab", "no_dir", "no_weights", "keep", "drop",
                                  "method", "option", "scope"])
def test_bad_input_clear_error_nothing_written(ckpts, tmp_path, case):
    kwargs, pattern = _bad_case(ckpts, tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern):
        E.merge_checkpoints(out=out, progress=False, **kwargs)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_vocab_mismatch_allowed_explicitly_merges_linear_only(ckpts, tmp_path):
    sd = fine_tuned(tiny_base(seed=0, vocab_size=80), seed=1)
    for name, v in ckpts["expert_sds"][0].items():       # same linear weights as expert 0
        if LINEAR.fullmatch(name):
            sd[name] = v
    odd = save_checkpoint(sd, tmp_path / "vocab", vocab_size=80)
    out = E.merge_checkpoints("ties", ckpts["base"], [odd, *ckpts["experts"][1:]], tmp_path / "out",
                              allow_vocab_mismatch=True, progress=False)
    _assert_state_equal(load_checkpoint(out), _expected("ties", ckpts))


def test_nan_in_copied_tensor_is_reported(ckpts, tmp_path):
    sd = {k: v.clone() for k, v in ckpts["base_sd"].items()}
    sd["model.norm.weight"][3] = float("inf")
    base = save_checkpoint(sd, tmp_path / "nanbase")
    with pytest.raises(E.MergeError, match=r"model\.norm\.weight in .*nanbase/model\.safetensors contains NaN"):
        E.merge_checkpoints("average", base, ckpts["experts"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- linear kernel
def _random(shape, dtype, seed):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _numpy(t):
    """torch -> numpy in the engine's dtypes (bfloat16 through ml_dtypes), bit for bit."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(T.DTYPES["BF16"])
    return t.numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method, options", [("average", {}), ("task_arithmetic", {"lam": 0.7})])
def test_linear_kernel_matches_torch_functions_across_blocks_and_threads(method, options, dtype):
    shape = (9, E.BLOCK + 77)                  # 9 blocks and a ragged tail: every worker thread gets work
    base = _random(shape, dtype, 0)
    experts = [_random(shape, dtype, i + 1) for i in range(3)]
    buffer = np.full(base.numel() + 50, np.nan, np.float32)
    got, finite = E.linear_merge(method, _numpy(base), [_numpy(e) for e in experts], out=buffer, **options)
    assert finite and got.shape == shape and got.dtype == np.float32
    assert np.shares_memory(got, buffer)
    expected = getattr(M, method)(base, experts, **options)
    if method == "average":
        assert torch.equal(torch.from_numpy(got), expected)
    else:
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-6, atol=1e-6)


def test_linear_kernel_reports_non_finite_in_any_block():
    size = 5 * E.BLOCK
    experts = [np.ones(size, np.float32) for _ in range(2)]
    assert E.linear_merge("average", experts[0], experts)[1]
    experts[1][size - 3] = np.inf
    result, finite = E.linear_merge("average", experts[0], experts)
    assert not finite and np.isinf(result[size - 3])
    assert E.linear_merge("average", np.zeros(0, np.float32), [np.zeros(0, np.float32)])[1]


def test_linear_bfloat16_checkpoints_round_like_torch(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in tiny_base(seed=4).items()}
    experts = [{k: v.to(torch.bfloat16) for k, v in fine_tuned(base, i).items()} for i in range(3)]
    b = save_checkpoint(base, tmp_path / "b")
    es = [save_checkpoint(e, tmp_path / f"e{i}") for i, e in enumerate(experts)]
    got = load_checkpoint(E.merge_checkpoints("task_arithmetic", b, es, tmp_path / "out", lam=0.3,
                                              progress=False))
    same, total = 0, 0
    for name in base:
        if LINEAR.fullmatch(name):
            ref = M.task_arithmetic(base[name], [e[name] for e in experts], lam=0.3).to(torch.bfloat16)
            assert got[name].dtype == torch.bfloat16
            # float32 results may differ in the last bit (fused multiply-add in torch); after
            # rounding to bfloat16 that is at most one bfloat16 step, and almost never.
            torch.testing.assert_close(got[name].float(), ref.float(), rtol=2**-7, atol=0)
            same, total = same + int((got[name] == ref).sum()), total + ref.numel()
        else:
            assert torch.equal(got[name], base[name])
    assert same >= 0.999 * total


_IMPORTS_TORCH = ("import sys; from mckit.__main__ import main; rc = main(sys.argv[1:]); "
                  "print(rc, 'torch' in sys.modules)")


@pytest.mark.parametrize("method, imports_torch", [("average", False), ("task_arithmetic", False),
                                                   ("ties", False), ("dare_ties", True)])
def test_block_merges_never_import_torch(ckpts, tmp_path, method, imports_torch):
    args = ["merge", "--method", method, "--base", str(ckpts["base"]), "--models",
            *map(str, ckpts["experts"]), "--out", str(tmp_path / "out"), "--quiet"]
    done = subprocess.run([sys.executable, "-c", _IMPORTS_TORCH, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", str(imports_torch)]


REAL_NAMES = {
    # LLaVA-1.5 (transformers layout): CLIP vision tower, projector, Llama language model
    "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": False,
    "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": False,
    "model.multi_modal_projector.linear_1.weight": False,
    "model.language_model.layers.0.self_attn.q_proj.weight": True,
    "model.language_model.layers.0.mlp.down_proj.weight": True,
    "language_model.model.layers.1.self_attn.o_proj.weight": True,
    "vision_tower.vision_model.encoder.layers.1.self_attn.v_proj.weight": False,
    # Qwen2-VL / Qwen2.5-VL: vision blocks (2.5 uses gate/up/down_proj in its vision MLP), Qwen2 language model
    "model.visual.blocks.0.attn.qkv.weight": False,
    "model.visual.blocks.0.mlp.gate_proj.weight": False,
    "visual.blocks.3.mlp.down_proj.weight": False,
    "model.layers.2.self_attn.k_proj.weight": True,
    "model.layers.2.mlp.up_proj.weight": True,
    # Qwen2-Audio / Qwen2.5-Omni thinker: Whisper-style audio tower
    "audio_tower.layers.0.self_attn.q_proj.weight": False,
    "thinker.audio_tower.layers.0.mlp.fc2.weight": False,
    "thinker.model.layers.0.self_attn.v_proj.weight": True,
    "model.layers.0.input_layernorm.weight": False,
    "lm_head.weight": False,
}


def test_default_filter_selects_only_the_language_models_linears():
    pattern = re.compile(E.DEFAULT_INCLUDE)
    assert {n: bool(pattern.fullmatch(n)) for n in REAL_NAMES} == REAL_NAMES


def test_vision_and_audio_towers_are_copied_not_merged(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(4, 4, generator=g) for n in REAL_NAMES}
    experts = [{n: t + torch.randn(4, 4, generator=g) for n, t in base.items()} for _ in range(2)]
    dirs = []
    for i, sd in enumerate([base, *experts]):
        (tmp_path / str(i)).mkdir()
        save_file(sd, str(tmp_path / str(i) / "model.safetensors"))
        dirs.append(tmp_path / str(i))
    got = load_checkpoint(E.merge_checkpoints("average", dirs[0], dirs[1:], tmp_path / "out", progress=False))
    for name, merged in REAL_NAMES.items():
        expected = (experts[0][name] + experts[1][name]) / 2 if merged else base[name]
        torch.testing.assert_close(got[name], expected, msg=name)


@pytest.mark.parametrize("method", ["dare_ta", "dare_ties"])
def test_composition_and_streamed_merge_draw_the_same_dare_masks(ckpts, tmp_path, method):
    """Composition merges in memory (name by name) and the engine streams: DARE is seeded by tensor name in
    both, so the merged weights are the same bits."""
    from mckit.compose.static import method_deltas

    base, experts = ckpts["base_sd"], ckpts["expert_sds"]
    model = torch.nn.Module()
    model.state_dict = lambda: base                       # composition reads theta_0 through state_dict()
    taus = [{n: e[n] - base[n] for n in base if LINEAR.fullmatch(n)} for e in experts]
    deltas = method_deltas(taus, model, method, drop=0.3, seed=9)
    streamed = load_checkpoint(E.merge_checkpoints(method, ckpts["base"], ckpts["experts"], tmp_path / "out",
                                                   seed=9, drop=0.3, progress=False))
    in_memory = {n: kernels.merge_tensor(method, n, base[n], [base[n] + t[n] for t in taus], {"drop": 0.3, "seed": 9})
                 for n in deltas}
    for name in deltas:
        assert torch.equal(streamed[name], in_memory[name]), name
        torch.testing.assert_close(base[name] + deltas[name], streamed[name], atol=1e-6, rtol=0)
