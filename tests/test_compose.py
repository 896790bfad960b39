"""Composition on the shipped world: the formulas, the LoRA trap, the controls, bad input."""

import copy

import pytest
import torch

from mckit.compose import static as compose
from mckit.merge.task_vectors import task_vector
from mckit.models import shipped
from mckit.models.checkpoints import CheckpointError
from mckit.world.entities import MODALITIES


@pytest.fixture(scope="module")
def base():
    return shipped.load_base()


@pytest.fixture(scope="module")
def lora_models():
    return {m: shipped.load_model(m, "lora") for m in MODALITIES}


def _state(model):
    llm = model.llm
    return (llm.get_base_model() if hasattr(llm, "get_base_model") else llm).state_dict()


def test_naivemc_is_base_plus_mean_of_lora_products(base, lora_models):
    composed = compose.naivemc(lora_models, base)
    assert composed.modalities == list(MODALITIES)
    taus = [task_vector(m, base) for m in lora_models.values()]
    name = "model.layers.2.mlp.down_proj.weight"
    expected = base.state_dict()[name] + sum(t[name] for t in taus) / 4
    assert torch.allclose(_state(composed)[name], expected, atol=1e-6)
    assert torch.equal(_state(composed)["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])


def test_averaging_lora_factors_is_not_averaging_products(base, lora_models):
    trap = compose.lora_trap_table(lora_models, base)
    assert len(trap) == 7 * base.config.num_hidden_layers
    assert trap["relative_error"].min() > 0.1, trap.describe()


def test_full_naivemc_equals_weight_average(base):
    full = {m: shipped.load_model(m, "full") for m in ("image", "point")}
    composed = compose.naivemc(full, base)
    name = "model.layers.0.self_attn.q_proj.weight"
    mean = (_state(full["image"])[name] + _state(full["point"])[name]) / 2
    assert torch.allclose(_state(composed)[name], mean, atol=1e-6)


def test_any_subset_and_order(base, lora_models):
    pair = compose.naivemc([lora_models["point"], lora_models["audio"]], base)
    assert sorted(pair.modalities) == ["audio", "point"]


def test_controls(base, lora_models):
    tau = task_vector(lora_models["video"], base)
    name = next(iter(tau))
    diluted = compose.dilution_control(lora_models["video"], base, 4)
    assert diluted.modalities == ["video"]
    assert torch.allclose(_state(diluted)[name], base.state_dict()[name] + tau[name] / 4, atol=1e-6)
    allp = compose.all_projectors_control(lora_models["video"], lora_models)
    assert sorted(allp.modalities) == sorted(MODALITIES)
    assert torch.allclose(_state(allp)[name], base.state_dict()[name] + tau[name], atol=1e-6)
    for m in MODALITIES:  # branches are the source models' own
        assert torch.equal(allp.branches[m].projector.state_dict()[next(iter(allp.branches[m].projector.state_dict()))],
                           next(iter(lora_models[m].branches[m].projector.state_dict().values())))


def test_frozen_composition_keeps_the_base(base):
    stage1 = {m: shipped.load_model(m, "stage1") for m in MODALITIES}
    frozen = compose.frozen_compose(stage1, base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in _state(frozen).items())
    with pytest.raises(ValueError, match="changed its LLM"):
        compose.frozen_compose({"image": shipped.load_model("image", "full")}, base)


def test_different_base_is_refused(base, lora_models):
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(0.01)
    with pytest.raises(CheckpointError, match="built on another base LLM.*embed_tokens"):
        compose.naivemc(lora_models, other)


def test_duplicated_modality_is_refused(base, lora_models):
    with pytest.raises(ValueError, match="modality 'image' appears twice"):
        compose.naivemc([lora_models["image"], shipped.load_model("image", "full")], base)
