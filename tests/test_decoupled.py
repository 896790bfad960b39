"""DAMC's decoupled models: routing of the two LoRAs, training, the peft layout on disk, and the composition."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from mckit.compose.damc import damc
from mckit.compose.routed import modality_routed
from mckit.compose.static import add_deltas, naivemc
from mckit.merge.task_vectors import task_vector
from mckit.models.checkpoints import CheckpointError, load_mllm, save_mllm
from mckit.models.decoupled import SPAN, decouple, decoupled_deltas, route_factors
from mckit.models.lora import quiet_peft
from mckit.models.mllm import MLLM
from mckit.models.training import FeatureBank, add_lora, train_stage2
from mckit.world.render import render, render_bank
from mckit.world.tasks import chat


def _single(tiny_mllm, mod):
    return MLLM(copy.deepcopy(tiny_mllm.llm), tiny_mllm.tokenizer, {mod: copy.deepcopy(tiny_mllm.branches[mod])})


def _randomise(model, route, seed, scale=0.2):
    """Random factors on one route of a decoupled model (B = 0 at init would hide every routing bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in route_factors(model.llm)[route].values():
            delta.A.copy_(torch.randn(delta.A.shape, generator=g) * scale)
            delta.B.copy_(torch.randn(delta.B.shape, generator=g) * scale)
    return model


def _batch(world, model, with_input=True):
    mods = model.modalities
    rng = np.random.default_rng(0)
    prompts = [chat(" ".join(f"{m} : <{m}> ." for m in mods) + " what is this ?"), chat("what is the colour ?")]
    inputs = [{m: [render(m, world, world.entities[k], "high", rng)] for k, m in enumerate(mods)}, {}]
    return model.batch(prompts if with_input else prompts[1:], inputs if with_input else inputs[1:])


def test_decoupled_model_starts_at_the_plain_model_and_frames_each_input(world, tiny_mllm):
    plain = _single(tiny_mllm, "image")
    model = decouple(plain, rank=4)
    assert model.n_tokens == {"image": 1 + 2 * SPAN} and plain.n_tokens == {"image": 1}
    batch = _batch(world, model)
    assert int((batch.routes == 1).sum()) == 1 + 2 * SPAN
    reference = MLLM(plain.llm, plain.tokenizer, dict(model.branches)).eval()      # same framing, no LoRA
    torch.testing.assert_close(model.eval()(batch).logits, reference(batch).logits)


def test_text_positions_take_the_text_lora_and_modality_positions_the_other(world, tiny_mllm):
    plain = _single(tiny_mllm, "image")
    model = _randomise(decouple(plain, rank=4), 0, seed=1).eval()
    text = {w: d.dense() for w, d in route_factors(model.llm)[0].items()}
    text_only = _batch(world, model, with_input=False)
    folded = MLLM(add_deltas(plain.llm, text), plain.tokenizer, dict(model.branches)).eval()
    torch.testing.assert_close(model(text_only).logits, folded(text_only).logits, atol=1e-5, rtol=1e-4)
    _randomise(model, 1, seed=2)                                          # the modality LoRA: text-only prompts
    torch.testing.assert_close(model(text_only).logits, folded(text_only).logits, atol=1e-5, rtol=1e-4)
    with_input = _batch(world, model)                                     # ... but not prompts with an input
    assert not torch.allclose(model(with_input).logits, folded(with_input).logits, atol=1e-3)


def test_training_moves_both_loras_and_the_framing_but_not_the_base(world, tiny_mllm):
    plain = _single(tiny_mllm, "point")
    model = decouple(plain, rank=4)
    bank = FeatureBank(model.branches["point"], render_bank("point", world, 2, 0))
    before = {k: v.clone() for k, v in model.llm.state_dict().items() if ".deltas." not in k}
    train_stage2(model, "point", world, bank, "decoupled", steps=3, batch_size=8, lr=1e-2, seed=0)
    for route in (0, 1):
        assert any(d.B.abs().max() > 0 for d in route_factors(model.llm)[route].values()), route
    assert model.branches["point"].projector.prefix.abs().max() > 0
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saved_as_two_peft_adapters_and_loaded_back(world, tiny_mllm, tmp_path):
    plain = _single(tiny_mllm, "audio")
    model = _randomise(_randomise(decouple(plain, rank=4), 0, 1), 1, 2).eval()
    plain.llm.save_pretrained(str(tmp_path / "base"))
    save_mllm(model, tmp_path / "m", base_path=tmp_path / "base")
    meta = json.loads((tmp_path / "m" / "mllm.json").read_text())
    assert meta["llm"]["kind"] == "decoupled" and meta["modalities"]["audio"]["span"] == SPAN
    loaded = load_mllm(tmp_path / "m")
    batch = _batch(world, model)
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits)
    text_only = _batch(world, model, with_input=False)                    # peft reads the text LoRA as a LoRA model
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(plain.llm), str(tmp_path / "m" / "adapters" / "text"))
    peft_model.eval()
    via_peft = MLLM(peft_model, plain.tokenizer, dict(model.branches)).eval()
    torch.testing.assert_close(via_peft(text_only).logits, model(text_only).logits, atol=1e-5, rtol=1e-4)


def test_bad_decoupled_checkpoints_name_the_culprit(tiny_mllm, tmp_path):
    plain = _single(tiny_mllm, "audio")
    plain.llm.save_pretrained(str(tmp_path / "base"))
    save_mllm(decouple(plain, rank=4), tmp_path / "m", base_path=tmp_path / "base")
    for name, damage in [("route", lambda p: __import__("shutil").rmtree(p / "adapters" / "audio")),
                         ("shape", _wrong_shape), ("framing", _no_prefix)]:
        broken = tmp_path / name
        __import__("shutil").copytree(tmp_path / "m", broken)
        damage(broken)
        with pytest.raises(CheckpointError, match={"route": "no LoRA adapter for route 'audio'",
                                                   "shape": "do not fit the linear",
                                                   "framing": "audio.projector.prefix"}[name]):
            load_mllm(broken)


def _wrong_shape(path):
    from safetensors.torch import load_file, save_file

    file = path / "adapters" / "text" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    save_file(tensors, str(file))


def _no_prefix(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "branches.safetensors"))
    del tensors["audio.projector.prefix"]
    save_file(tensors, str(path / "branches.safetensors"))


# --------------------------------------------------------------------------- composition

@pytest.fixture()
def decoupled_models(tiny_mllm):
    return {m: _randomise(_randomise(decouple(_single(tiny_mllm, m), rank=4), 0, 10 + i, 0.1), 1, 20 + i)
            for i, m in enumerate(("image", "audio", "video"))}


def test_damc_routes_text_on_the_merged_text_loras_and_each_input_on_its_own(world, tiny_mllm, decoupled_models):
    base = tiny_mllm.llm
    composed = damc(decoupled_models, base)
    text = {w: sum(decoupled_deltas(m)["text"][w] for m in decoupled_models.values()) / 3
            for w in decoupled_deltas(decoupled_models["image"])["text"]}
    text_only = _batch(world, composed, with_input=False)
    reference = MLLM(add_deltas(base, text), tiny_mllm.tokenizer, dict(composed.branches)).eval()
    torch.testing.assert_close(composed(text_only).logits, reference(text_only).logits, atol=1e-5, rtol=1e-4)
    # one modality composed alone, at lambda 1: exactly its own decoupled model
    alone = damc({"audio": decoupled_models["audio"]}, base, lam=1.0)
    batch = _batch(world, alone)
    torch.testing.assert_close(alone(batch).logits, decoupled_models["audio"].eval()(batch).logits,
                               atol=1e-5, rtol=1e-4)
    # a zero modality scale: the modality's positions run on the base weights
    muted = damc(decoupled_models, base, modality_scale=[0.0, 1.0, 1.0])
    assert not torch.allclose(muted(_batch(world, muted)).logits, composed(_batch(world, composed)).logits)


def test_damc_ties_and_lambdas_change_only_the_text_route(world, tiny_mllm, decoupled_models):
    base = tiny_mllm.llm
    batch = _batch(world, damc(decoupled_models, base))
    default, ties = damc(decoupled_models, base), damc(decoupled_models, base, text_method="ties")
    tuned = damc(decoupled_models, base, lam=[0.5, 0.3, 0.2])
    for other in (ties, tuned):
        assert not torch.allclose(other(batch).logits, default(batch).logits)


def test_damc_refuses_bad_input(tiny_mllm, decoupled_models):
    base = tiny_mllm.llm
    plain = _single(tiny_mllm, "point")
    with pytest.raises(ValueError, match="point model is not decoupled"):
        damc({**decoupled_models, "point": plain}, base)
    with pytest.raises(ValueError, match="the image model is decoupled"):
        naivemc({"image": decoupled_models["image"], "point": plain}, base)
    with pytest.raises(CheckpointError, match="decoupled"):
        task_vector(decoupled_models["image"], base)
    with pytest.raises(ValueError, match="2 coefficients lam for 3 models"):
        damc(decoupled_models, base, lam=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"lam\[1\] = -0.1 is negative"):
        damc(decoupled_models, base, lam=[0.5, -0.1, 0.2])
    with pytest.raises(ValueError, match=r"coefficient modality_scale\[0\] = nan"):
        damc(decoupled_models, base, modality_scale=[float("nan"), 1, 1])
    with pytest.raises(ValueError, match="unknown text_method"):
        damc(decoupled_models, base, text_method="mean")


def test_inference_only_decoupling_copies_one_lora_into_both_routes(world, tiny_mllm):
    base = tiny_mllm.llm
    loras = {}
    for m in ("image", "audio"):
        model = _single(tiny_mllm, m)
        add_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.llm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        loras[m] = model.eval()
    routed = modality_routed(loras, base)
    text_only = _batch(world, routed, with_input=False)
    torch.testing.assert_close(routed(text_only).logits, naivemc(loras, base)(text_only).logits, atol=1e-5, rtol=1e-4)
