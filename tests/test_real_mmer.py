"""MMER over real checkpoint layouts (`compose --method mmer`): tau* and the masks streamed over the shards equal
MMER's in-memory functions, the masks are bit-packed on disk, and the loaded model routes each modality."""

import json

import numpy as np
import pytest
import torch
from _real_checkpoints import build, build_base, routed_and_plain, word_tokenizer
from safetensors import safe_open

from mckit.__main__ import main
from mckit.compose.checkpoints import compose_checkpoints, load_composed
from mckit.compose.mmer import build_masks, unpack
from mckit.merge.checks import MergeError
from mckit.models.real_llm import load_text_llm, read_llm_state
from mckit.models.routing import RoutedLinear


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmer")
    base = build_base("llava", root / "vicuna")
    build("llava", root / "llava", 1, base)
    build("video_llava", root / "video_llava", 2, base)
    out = root / "composed"
    rc = main(["compose", "--method", "mmer", "--base", str(root / "vicuna"), "--sources", str(root / "llava"),
               f"{root / 'video_llava'}:video", "--out", str(out), "--keep", "0.5", "--lam", "0.8", "--quiet"])
    assert rc == 0
    base_sd = base.state_dict()
    taus = {m: {n: t - base_sd[n] for n, t in read_llm_state(root / k).items() if n.endswith("proj.weight")}
            for m, k in (("image", "llava"), ("video", "video_llava"))}
    return {"root": root, "out": out, "base": base_sd, "base_llm": base, "want": build_masks(taus, keep=0.5, lam=0.8)}


def _stored(out):
    with safe_open(str(out / "mmer.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_streamed_tau_star_and_masks_equal_the_in_memory_ones(llama):
    want, stored = llama["want"], _stored(llama["out"])
    assert set(want.tau_star) == {k[len("tau_star."):] for k in stored if k.startswith("tau_star.")}
    for name, tau in want.tau_star.items():
        assert torch.allclose(stored[f"tau_star.{name}"], tau, rtol=0, atol=1e-7), name
        for mod in ("image", "video"):
            packed = stored[f"mask.{mod}.{name}"]
            assert packed.dtype == torch.uint8 and packed.numel() == (tau.numel() + 7) // 8
            assert torch.equal(unpack(packed, tau.shape), want.masks[mod][name]), (mod, name)
    manifest = json.loads((llama["out"] / "manifest.json").read_text())
    assert manifest["mmer"]["modalities"] == ["image", "video"] and manifest["mmer"]["lam"] == [0.8, 0.8]
    for mod, share in want.density().items():
        assert manifest["mmer"]["density"][mod] == pytest.approx(share, abs=1e-12)


def test_the_llm_holds_the_text_route_and_each_modality_routes_through_its_mask(llama):
    """llm/ = theta_0 + mean_i(m_i) tau*; in every linear, the image route's weight is theta_0 + m_image tau*."""
    want, base = llama["want"], llama["base"]
    model = load_composed(llama["out"])
    routed = {n: m for n, m in model.llm.named_modules() if isinstance(m, RoutedLinear)}
    assert len(routed) == len(want.tau_star)
    mean = want.mean_mask()
    for name, tau in want.tau_star.items():
        layer = routed[name.removesuffix(".weight")]
        assert torch.allclose(layer.weight, base[name] + mean[name] * tau, atol=1e-6), name
        for mod in ("image", "video"):
            delta = layer.deltas[str(model.route_ids[mod])].weight()
            assert torch.allclose(layer.weight + delta, base[name] + want.masks[mod][name] * tau, atol=1e-6)
    routed_logits, plain = routed_and_plain(model)
    assert not torch.allclose(routed_logits, plain, atol=1e-4)      # the image positions ran their own weights


def test_one_source_kept_whole_gives_its_native_model_back(llama, tmp_path):
    """One source, K = 1: tau* = tau, m = [tau != 0], so every route runs theta_0 + tau, the source's own LLM
    (the base: the source's LLM with vicuna's linears, so that only the merged linears differ)."""
    root = llama["root"]
    own = load_text_llm(root / "llava")
    own.load_state_dict({n: t for n, t in llama["base"].items() if n.endswith("proj.weight")}, strict=False)
    own.save_pretrained(tmp_path / "own")
    word_tokenizer().save_pretrained(tmp_path / "own")
    out = compose_checkpoints("mmer", tmp_path / "own", [f"{root / 'llava'}:image"], tmp_path / "one",
                              progress=False, keep=1.0)
    model = load_composed(out)
    native = build("llava", tmp_path / "native", 1, llama["base_llm"])
    torch.manual_seed(3)
    x = torch.randn(1, *model.branches["image"].input_shape)
    with torch.no_grad():
        got = model(model.batch(["w5 w17 <image> w42 w9"], [{"image": [x[0]]}])).logits
        ids = [5, 17] + [native.config.image_token_index] * model.branches["image"].n_tokens + [42, 9]
        want = native(input_ids=torch.tensor([ids]), pixel_values=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("sources, options, message", [
    (["video_llava"], {}, "mmer takes one modality per source: "),
    (["llava", "video_llava:video"], {"drop": 0.5}, "option(s) drop do not apply to mmer"),
    (["llava", "video_llava:video"], {"lam": 3.0}, "lam[0] = 3.0 is outside (0, 2]"),
    (["llava", "video_llava:video"], {"scope": "global"}, "trims per tensor"),
])
def test_bad_mmer_compositions_are_named_and_write_nothing(llama, tmp_path, sources, options, message):
    root = llama["root"]
    with pytest.raises(MergeError) as err:
        compose_checkpoints("mmer", root / "vicuna", [str(root / s) for s in sources], tmp_path / "bad",
                            progress=False, **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())


def test_masks_take_one_bit_per_entry(llama):
    stored = _stored(llama["out"])
    bits = sum(t.numel() for k, t in stored.items() if k.startswith("mask."))
    entries = sum(t.numel() for k, t in stored.items() if k.startswith("tau_star."))
    assert bits == sum((t.numel() + 7) // 8 for k, t in stored.items() if k.startswith("tau_star.")) * 2
    assert bits * 8 < 2 * entries + 8 * len(stored) and np.isfinite(bits)


def test_a_routed_mmer_model_evaluates_real_mcub_files_and_batches_like_one_by_one(llama, tmp_path):
    """Routes follow each item's inputs through batched greedy decoding (padding, several modalities a prompt)."""
    from _real_checkpoints import evaluate_twice, save_clip_processor

    root = llama["root"]
    for kind in ("llava", "video_llava"):
        save_clip_processor(root / kind)
    out = compose_checkpoints("mmer", root / "vicuna", [f"{root / 'llava'}:image", f"{root / 'video_llava'}:video"],
                              tmp_path / "mmer", progress=False)
    _, batched, alone = evaluate_twice(out, tmp_path / "mcub")
    assert batched["n"] == 3 and batched["answers"] == alone["answers"]
