"""The shipped toy world's trained MLLMs really work: far above chance on held-out renders."""

import pytest

from mckit.eval.single import evaluate_model
from mckit.merge.task_vectors import task_vector
from mckit.models import shipped as models
from mckit.world.entities import MODALITIES


@pytest.fixture(scope="module")
def shipped():
    return models.load_world(), models.load_base()


@pytest.mark.parametrize("variant", ["lora", "full"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_trained_mllm_identifies_its_modality(shipped, modality, variant):
    world, _ = shipped
    model = models.load_model(modality, variant)
    result = evaluate_model(model, world, modality, n=200, seed=7).set_index("task")
    # 40 items per task; chance is 1/32 for identify and 1/4 for attributes. The weakest model
    # (image) measured 0.24-0.26 identify and 0.50-0.56 attribute on 80 held-out items at build time.
    assert result.loc["identify", "acc"] >= 4 / 32, result
    assert result.loc["attribute", "acc"] >= 0.35, result


@pytest.mark.parametrize("modality", MODALITIES)
def test_task_vectors_are_real_and_lora_is_low_rank(shipped, modality):
    _, base = shipped
    full = task_vector(models.load_model(modality, "full"), base)
    lora = task_vector(models.load_model(modality, "lora"), base)
    assert set(full) == set(lora) and len(full) == 7 * base.config.num_hidden_layers
    rank = models.world_record()["config"]["lora_rank"]
    for name, t in lora.items():
        assert t.norm() > 0 and full[name].norm() > 0
        assert int((t.float().svd().S > 1e-6 * t.norm()).sum()) <= rank, name


def test_world_record_matches_world():
    rec = models.world_record()
    assert [e["name"] for e in rec["entities"]] == models.load_world().names
    assert set(rec["models"]) == {f"{m}-{v}" for m in MODALITIES for v in models.VARIANTS}
