"""The world and the experts built together, two processes at once: the same weights as one after the other."""

import pytest
import torch
from _build_helpers import same_weights
from test_build import micro

from mckit.build.experts import ExpertsConfig, build_experts
from mckit.build.together import build_all
from mckit.build.world import build_world


def test_world_and_experts_together_write_the_weights_of_the_two_builds_in_turn(tmp_path):
    assert torch.get_num_threads() == 1
    cfg = ExpertsConfig.preset("smoke")
    world, experts = build_all(tmp_path / "together" / "world", tmp_path / "together" / "experts", micro(), cfg)
    alone = build_world(tmp_path / "alone" / "world", micro())
    experts_alone = build_experts(tmp_path / "alone" / "experts", tmp_path / "alone" / "world", cfg)
    assert world["models"] == alone["models"] and experts["models"] == experts_alone["models"]
    assert experts["world"] == "world" and torch.get_num_threads() == 1
    assert len(same_weights(tmp_path / "together" / "world", tmp_path / "alone" / "world")) == 7
    assert len(same_weights(tmp_path / "together" / "experts", tmp_path / "alone" / "experts")) == 2 + 12 * 2
    assert sorted(p.name for p in (tmp_path / "together").iterdir()) == ["experts", "world"]   # no stages left


def test_build_all_refuses_bad_outputs_before_training(tmp_path):
    with pytest.raises(ValueError, match="two folders"):
        build_all(tmp_path / "out", tmp_path / "out", micro(), ExpertsConfig.preset("smoke"))
    (tmp_path / "experts").mkdir()
    with pytest.raises(FileExistsError):
        build_all(tmp_path / "world", tmp_path / "experts", micro(), ExpertsConfig.preset("smoke"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts"]


def test_a_failed_experts_build_is_reported_with_how_to_resume(tmp_path):
    broken = ExpertsConfig(**{**ExpertsConfig.SMOKE, "encoder_batch": 0})       # fails in its first stage
    with pytest.raises(RuntimeError, match="experts' build failed .* resumes the experts"):
        build_all(tmp_path / "world", tmp_path / "experts", micro(), broken)
    assert (tmp_path / "world" / "world.json").is_file() and not (tmp_path / "experts").exists()
