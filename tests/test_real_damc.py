"""DAMC over real checkpoint layouts (`compose --method damc`): decoupled sources (a real MLLM on the base's language
model + peft text and modality LoRAs) composed into W_text on disk and low-rank routes on load, checked against
peft's own delta weights and the native peft models."""

import json
import shutil

import pytest
import torch
from _real_checkpoints import build, build_base, routed_and_plain
from safetensors import safe_open
from safetensors.torch import load_file

from mckit.__main__ import main
from mckit.compose.checkpoints import compose_checkpoints, load_composed
from mckit.merge.checks import MergeError
from mckit.models.families import family_of, llm_name
from mckit.models.routing import RoutedLinear
from mckit.models.tiny_real import save_decoupled_adapters


def peft_deltas(peft_model, adapter: str) -> dict:
    """{causal-LM weight name: dW} of one adapter, as peft computes it (``get_delta_weight``)."""
    from peft.tuners.lora import LoraLayer

    family = family_of(peft_model.base_model.model.config.to_dict())
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = llm_name(family, name.removeprefix("base_model.model.") + ".weight")
            out[key] = module.get_delta_weight(adapter).detach()
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("damc")
    base = build_base("llava", root / "vicuna")
    peft = {}
    for seed, (kind, mod) in enumerate((("llava", "image"), ("video_llava", "video")), start=1):
        model = build(kind, root / kind, seed, base, spread=0.0)
        peft[mod] = save_decoupled_adapters(model, root / kind, mod, seed=seed)
    out = root / "composed"
    rc = main(["compose", "--method", "damc", "--base", str(root / "vicuna"), "--sources", f"{root / 'llava'}:image",
               f"{root / 'video_llava'}:video", "--out", str(out), "--lam", "0.7", "--quiet"])
    assert rc == 0
    return {"root": root, "out": out, "base": base, "peft": peft}


def test_the_llm_holds_the_text_route_and_each_modality_routes_through_its_own_lora(llama):
    """llm/ = W0 + sum_i lambda_i dW_i_text; in every adapted linear the image route's weight is W0 + dW_image,
    the deltas being peft's own."""
    base, peft = llama["base"].state_dict(), llama["peft"]
    texts = {m: peft_deltas(p, "text") for m, p in peft.items()}
    modal = {m: peft_deltas(p, m) for m, p in peft.items()}
    stored = load_file(str(llama["out"] / "llm" / "model.safetensors"))
    assert set(texts["image"]) == set(modal["video"]) and len(texts["image"]) == 14
    for name, theta_0 in base.items():
        want = theta_0 + 0.7 * sum(t[name] for t in texts.values()) if name in texts["image"] else theta_0
        assert torch.allclose(stored[name], want, atol=1e-6), name
    model = load_composed(llama["out"])
    routed = {n: m for n, m in model.llm.named_modules() if isinstance(m, RoutedLinear)}
    assert len(routed) == 14
    for name, layer in routed.items():
        for mod in ("image", "video"):
            weight = layer.weight + layer.deltas[str(model.route_ids[mod])].dense()
            assert torch.allclose(weight, base[name + ".weight"] + modal[mod][name + ".weight"], atol=1e-6)
    manifest = json.loads((llama["out"] / "manifest.json").read_text())
    assert manifest["damc"]["lam"] == [0.7, 0.7] and manifest["damc"]["rank"] == {"text": [4, 4], "image": 4,
                                                                                  "video": 4}
    with safe_open(str(llama["out"] / "damc.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).shape[0] == 8 for k in f.keys() if k.startswith("text.A."))


def _native_pair(root, tmp_path, same: bool):
    """One decoupled LLaVA on vicuna (its image adapter a copy of its text one when ``same``), composed alone with
    lambda 1, and its peft model with the text adapter active."""
    model = build("llava", tmp_path / "src", 5, build_base("llava", tmp_path / "vicuna"), spread=0.0)
    peft_model = save_decoupled_adapters(model, tmp_path / "src", "image", seed=5)
    if same:
        shutil.rmtree(tmp_path / "src" / "adapters" / "image")
        shutil.copytree(tmp_path / "src" / "adapters" / "text", tmp_path / "src" / "adapters" / "image")
    out = compose_checkpoints("damc", tmp_path / "vicuna", [f"{tmp_path / 'src'}:image"], tmp_path / "one",
                              progress=False, lam=1.0)
    peft_model.set_adapter("text")
    return load_composed(out), peft_model.eval()


@pytest.mark.parametrize("same", [True, False])
def test_one_source_alone_gives_its_native_peft_model_back(llama, tmp_path, same):
    """Text and image routes equal: an image prompt runs exactly the peft model with that adapter (towers,
    projector, placeholders and positions included); distinct routes: a text-only prompt runs its text LoRA."""
    composed, native = _native_pair(llama["root"], tmp_path, same)
    torch.manual_seed(3)
    x = torch.randn(1, *composed.branches["image"].input_shape)
    image = [native.base_model.model.config.image_token_index] * composed.branches["image"].n_tokens
    ids = [5, 17] + (image if same else []) + [42, 9]
    with torch.no_grad():
        got = composed(composed.batch(["w5 w17 <image> w42 w9" if same else "w5 w17 w42 w9"],
                                      [{"image": [x[0]]}] if same else [{}])).logits
        want = native(input_ids=torch.tensor([ids]), **({"pixel_values": x} if same else {})).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_image_positions_run_their_own_route(llama):
    routed, plain = routed_and_plain(load_composed(llama["out"]))
    assert not torch.allclose(routed, plain, atol=1e-4)


def _bad_source(root, kind: str):
    """A decoupled source broken in the way ``kind`` names."""
    src = root / kind
    model = build("llava", src, 9, build_base("llava", root / "vicuna_bad"), spread=0.05 if kind == "moved" else 0.0)
    if kind != "no_adapters":
        save_decoupled_adapters(model, src, "image", seed=9)
    if kind == "tower_lora":
        from safetensors.torch import load_file, save_file

        file = src / "adapters" / "image" / "adapter_model.safetensors"
        tensors = load_file(str(file))
        tensors["base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = \
            torch.zeros(4, 32)
        save_file(tensors, str(file))
    return src


@pytest.mark.parametrize("kind, options, message", [
    ("no_adapters", {}, "adapter_config.json is missing: a decoupled source carries peft adapters"),
    ("moved", {}, "its language model is not the base's"),
    ("tower_lora", {}, "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight adapts no linear"),
    ("fine", {"lam": -0.5}, "lam[0] = -0.5 is negative"),
    ("fine", {"keep": 0.5}, "option(s) keep do not apply to damc"),
])
def test_bad_damc_sources_are_named_and_write_nothing(tmp_path, kind, options, message):
    src = _bad_source(tmp_path, kind)
    with pytest.raises(MergeError) as err:
        compose_checkpoints("damc", tmp_path / "vicuna_bad", [f"{src}:image"], tmp_path / "out", progress=False,
                            **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_damc_model_evaluates_real_mcub_files_and_batches_like_one_by_one(llama):
    from _real_checkpoints import evaluate_twice, save_clip_processor

    root = llama["root"]
    for kind in ("llava", "video_llava"):
        save_clip_processor(root / kind)
    out = compose_checkpoints("damc", root / "vicuna", [f"{root / 'llava'}:image", f"{root / 'video_llava'}:video"],
                              root / "damc_eval", progress=False)
    _, batched, alone = evaluate_twice(out, root / "mcub")
    assert batched["n"] == 3 and batched["answers"] == alone["answers"]
