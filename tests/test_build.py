"""The build pipeline end to end at a micro scale: it trains, writes atomically, and loads back."""

import json

import pytest
import torch
from _build_helpers import counted, interrupted_at, same_weights

from mckit.build.world import BuildConfig, build_world
from mckit.merge.task_vectors import task_vector
from mckit.models import shipped


def micro() -> BuildConfig:
    return BuildConfig(encoder_steps=3, bank_per_entity=4, drill_steps=2, text_steps=4, text_batch=8, stage1_steps=2,
                       stage2_steps=3, mllm_batch=8, eval_items=5, modalities=("point",), hidden=32, layers=1,
                       lora_rank=4)


def test_build_world_micro(tmp_path):
    out = tmp_path / "world"
    record = build_world(out, micro())
    assert json.loads((out / "world.json").read_text())["seconds"] == record["seconds"]
    assert set(record["models"]) == {"point-stage1", "point-lora", "point-full", "point-frozen"}
    assert set(record["binding"]) == {"letter", "word", "drill"} and record["binding"]["drill"]["n"] == 5
    for variant in shipped.VARIANTS:
        model = shipped.load_model("point", variant, out)
        assert model.modalities == ["point"]
    base = shipped.load_base(out)
    tau = task_vector(shipped.load_model("point", "full", out), base)
    assert tau and all(torch.isfinite(t).all() for t in tau.values())
    assert not list(tmp_path.glob(".world.*")), "temporary build directory left behind"
    with pytest.raises(FileExistsError):
        build_world(out, micro())


def test_failed_build_leaves_no_output_and_no_half_stage(tmp_path, monkeypatch):
    import mckit.build.world as build

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build, "train_stage1", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_world(tmp_path / "world", micro())
    assert [p.name for p in tmp_path.iterdir()] == [".world.stages"]     # finished stages only, to resume from
    assert not list(tmp_path.rglob("*.running")) and not list((tmp_path / ".world.stages" / "models").iterdir())


def test_interrupted_world_build_resumes_to_the_same_models(tmp_path, monkeypatch):
    """Killed in its second stage-2 training, the build reruns only what had not finished, and every weight
    file equals an uninterrupted build's, byte for byte."""
    import mckit.build.world as build

    whole = build_world(tmp_path / "whole", micro())
    real, calls = build.train_stage2, []
    monkeypatch.setattr(build, "train_stage2", interrupted_at(real, 2, calls))
    with pytest.raises(KeyboardInterrupt):
        build_world(tmp_path / "resumed", micro())
    calls.clear()
    monkeypatch.setattr(build, "train_stage1", lambda *a, **k: pytest.fail("stage 1 had finished"))
    monkeypatch.setattr(build, "pretrain_text", lambda *a, **k: pytest.fail("the base LM had finished"))
    monkeypatch.setattr(build, "train_stage2", counted(real, calls))
    resumed = build_world(tmp_path / "resumed", micro())
    assert len(calls) == 2 and not (tmp_path / ".resumed.stages").exists()
    assert resumed["models"] == whole["models"] and resumed["encoders"] == whole["encoders"]
    weights = same_weights(tmp_path / "whole", tmp_path / "resumed")
    assert len(weights) == 1 + 4 + 1 + 1               # base; branches x 4; the full model's LLM; two adapters


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown build preset 'huge'"):
        BuildConfig.preset("huge")


def test_pretraining_updates_a_frozen_branch_encoder(world):
    """Branches hold frozen encoders; pretraining must still train them (and freeze them again)."""
    from mckit.models.encoders import pretrain_encoder
    from mckit.models.mllm import toy_branch
    from mckit.world.render import render_bank

    branch = toy_branch("point", 32)
    before = {k: v.clone() for k, v in branch.encoder.state_dict().items()}
    bank = render_bank("point", world, 2, seed=1)
    pretrain_encoder(branch.encoder, *(torch.from_numpy(bank[k]) for k in ("x", "entity", "level")),
                     n_entities=len(world.entities), steps=3)
    after = branch.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in branch.encoder.parameters())


def test_text_pretraining_starts_with_the_drill_then_keeps_a_share(world, tokenizer, monkeypatch):
    """The curriculum: drill_steps of drill items only, then the stream with drill_share of each batch."""
    from mckit.models import training
    from mckit.models.mllm import MLLM

    seen: list[list[str]] = []
    real = training.to_batch

    def spy(model, examples, banks, rng, **kw):
        seen.append([ex.task for ex in examples])
        return real(model, examples, banks, rng, **kw)

    monkeypatch.setattr(training, "to_batch", spy)
    model = MLLM(training.make_llm(tokenizer, hidden=16, layers=1, heads=2, intermediate=32), tokenizer, {})
    losses = training.pretrain_text(model, world, steps=3, batch_size=10, drill_steps=2, drill_share=0.2)
    assert len(losses) == 5 and len(seen) == 5
    assert all(set(tasks) == {"drill"} for tasks in seen[:2])
    assert all(tasks.count("drill") == 2 and len(tasks) == 10 for tasks in seen[2:])


def test_replicas_retrain_stage2_with_other_seeds(tmp_path):
    from mckit.build.world import train_replicas

    out = tmp_path / "world"
    build_world(out, micro())
    record = train_replicas(out, [1])
    assert set(record["models"]) == {"point-lora-s1"} and (out / "replicas.json").is_file()
    assert shipped.replica_seeds("lora", out) == [0, 1] and shipped.replica_seeds("full", out) == [0]
    base = shipped.load_base(out)
    own, replica = (task_vector(shipped.load_model("point", "lora", out, seed=s), base) for s in (0, 1))
    name = next(iter(own))
    assert not torch.allclose(own[name], replica[name])  # another seed, another model
    with pytest.raises(ValueError, match="seed 0 is the world's own"):
        train_replicas(out, [0])
    with pytest.raises(FileNotFoundError, match="build-seeds"):
        shipped.load_model("point", "lora", out, seed=7)


def test_decoupled_variant_is_built_for_seed_0_and_each_model_kept_as_it_finishes(tmp_path, monkeypatch):
    import mckit.build.world as build
    from mckit.models.decoupled import is_decoupled

    out = tmp_path / "world"
    build_world(out, micro())
    record = build.train_replicas(out, [0], "decoupled")
    assert set(record["models"]) == {"point-decoupled"}
    assert is_decoupled(shipped.load_model("point", "decoupled", out).llm)
    calls: list = []
    monkeypatch.setattr(build, "train_stage2", counted(build.train_stage2, calls))
    record = build.train_replicas(out, [0, 1], "decoupled")               # seed 0 is kept, seed 1 trained
    assert len(calls) == 1 and set(record["models"]) == {"point-decoupled", "point-decoupled-s1"}
    assert shipped.replica_seeds("decoupled", out) == [0, 1]


def test_replica_records_of_concurrent_builds_are_merged(tmp_path):
    from mckit.build.world import _add_replica

    record_file = tmp_path / "replicas.json"
    _add_replica(record_file, "point-decoupled-s1", {"identify": {"acc": 0.5}}, 10.0)
    # another build (another seed) wrote its model meanwhile; this one must not drop it
    other = json.loads(record_file.read_text())
    other["models"]["point-decoupled-s2"], other["seconds"]["point-decoupled-s2"] = {"identify": {"acc": 0.6}}, 11.0
    record_file.write_text(json.dumps(other))
    record = _add_replica(record_file, "image-decoupled-s1", {"identify": {"acc": 0.7}}, 12.0)
    assert set(record["models"]) == {"point-decoupled-s1", "point-decoupled-s2", "image-decoupled-s1"}
    assert json.loads(record_file.read_text()) == record
