"""The merging benchmark's machinery: lambda scaling, method settings, lambda selection, the experts' build."""

import numpy as np
import pandas as pd
import pytest
import torch
from _build_helpers import counted, interrupted_at, same_weights

from mckit.build.experts import ExpertsConfig, build_experts
from mckit.experiments import merging_zoo, recipe
from mckit.merge.registry import get
from mckit.merge.task_vectors import task_vector
from mckit.models.shipped import load_expert
from mckit.world.capabilities import TASKS


@pytest.fixture(scope="module")
def tiny():
    """A base and three random task vectors over two linears (one wide, one tall)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    shapes = {n: base.state_dict()[n].shape for n in names}
    taus = [{n: 0.1 * torch.randn(shapes[n]) for n in names} for _ in range(3)]
    return base, taus


@pytest.mark.parametrize("regime", ["full", "lora"])
@pytest.mark.parametrize("name", [m for m in merging_zoo.BENCH_METHODS if get(m).has_lam])
def test_every_method_is_linear_in_lambda(tiny, name, regime):
    """Scaling X computed once at lambda = 1 is exact: method(lambda) = lambda * method(1)."""
    base, taus = tiny
    assert merging_zoo.lambda_linearity_error(taus, base, name, regime, lam=0.3) < 1e-6


def test_benchmark_methods_are_the_registry_at_the_papers_settings():
    assert merging_zoo.BENCH_METHODS == ("average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "tsv", "iso_c",
                                         "wudi", "optmerge")
    assert get("ties").defaults()["keep"] == 0.2 and get("dare_ta").defaults()["drop"] == 0.2
    with pytest.raises(ValueError, match="unknown merge method 'dare'"):
        merging_zoo.direction([], None, "dare", "full")


def test_weight_average_direction_is_mean_task_vector(tiny):
    base, taus = tiny
    got = merging_zoo.direction(taus, base, "average", "full")
    for name in got:
        assert torch.allclose(got[name], sum(t[name] for t in taus) / 3, atol=1e-6)


def test_choose_lambda_uses_validation_and_breaks_ties_low():
    scores = {0.1: 0.2, 0.3: 0.5, 0.5: 0.5, 1.0: 0.4}
    lam, seen = merging_zoo.choose_lambda(lambda lam: lam, lambda model: scores[model], grid=scores)
    assert lam == 0.3 and seen == scores


@pytest.fixture(scope="module")
def smoke_experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "experts"
    build_experts(out, config=ExpertsConfig.preset("smoke"))
    return out


def test_experts_keep_the_base_vision_side_and_embeddings(smoke_experts):
    base = load_expert("base", "full", smoke_experts)
    base_branch = base.branches["image"].state_dict()
    for regime in ("full", "lora"):
        for name in (*TASKS, "multitask"):
            model = load_expert(name, regime, smoke_experts)
            assert all(torch.equal(v, base_branch[k]) for k, v in model.branches["image"].state_dict().items())
            tau = task_vector(model, base.llm)
            assert tau and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj") for k in tau), sorted(tau)


def test_capability_table_runs_on_smoke_experts(smoke_experts):
    table = merging_zoo.capability_table("lora", n_val=2, n_test=2, methods=["average", "ties"],
                                         experts_dir=smoke_experts)
    assert set(table) == {"base", *(f"expert:{t}" for t in TASKS), "multitask", "average", "ties"}
    assert table["ties"]["lam"] in merging_zoo.LAMBDAS and len(table["ties"]["val"]) == len(merging_zoo.LAMBDAS)
    assert table["average"]["val"] == {}
    frame = merging_zoo.capability_frame(table, "lora")
    assert set(frame["task"]) == {*TASKS, "mean"} and frame["acc"].between(0, 1).all()


@pytest.mark.parametrize("regime", ["full", "lora"])
def test_expert_geometry_measures_the_task_vectors(smoke_experts, regime):
    geo = recipe.expert_geometry(regime, smoke_experts)
    base = load_expert("base", regime, smoke_experts).llm
    tau = task_vector(load_expert("chart", regime, smoke_experts), base)
    ref = base.state_dict()
    by_hand = torch.sqrt(sum(t.pow(2).sum() for t in tau.values()) / sum(ref[k].pow(2).sum() for k in tau))
    assert geo["rel_norm"]["chart"] == pytest.approx(float(by_hand), rel=1e-4)
    cos = pd.DataFrame(geo["cosine"])
    assert list(cos.index) == list(TASKS) and (cos.values.diagonal() == pytest.approx(1.0, abs=1e-5))
    assert (cos.values == pytest.approx(cos.values.T)) and -1 <= geo["cos_sum_multitask"] <= 1
    summary = recipe.geometry_summary({regime: geo})
    assert summary.loc["cosine_max", regime] == pytest.approx(max(cos.values[~np.eye(len(TASKS), dtype=bool)]))


def test_recipe_targets_read_the_table_as_the_targets_say():
    def row(own: dict | None = None, mean: float = 0.5, n: int = 1000, **extra) -> dict:
        return {"test": {**{t: {"acc": 0.5} for t in TASKS}, **(own or {}), "mean": {"acc": mean, "n": n}}, **extra}

    table = {"base": row(mean=0.40), **{f"expert:{t}": row({t: {"acc": 0.62}}) for t in TASKS},
             "multitask": row(mean=0.60), "average": row(mean=0.58, lam=1.0, val={}),
             "task_arithmetic": row(mean=0.46, lam=0.5, val={"0.5": 0.50, "1.0": 0.46}),
             "ties": row(mean=0.44, lam=1.0, val={"1.0": 0.52})}
    got = recipe.recipe_targets(table).set_index("criterion")
    assert got.loc["expert vqa: own task - base (points)", "value"] == pytest.approx(12.0)
    assert got.loc["multitask: mean - base (points)", "value"] == pytest.approx(20.0)
    assert got.loc["task arithmetic: val at lambda 1.0 / best val", "value"] == pytest.approx(0.92)
    best = "best merge (ties)"                  # chosen on validation (0.52 > 0.50); average has none
    assert got.loc[f"{best}: mean - base (points)", "value"] == pytest.approx(4.0)
    assert got.loc[f"{best}: share of the multi-task gain", "value"] == pytest.approx(0.2)
    low = got.loc[f"{best}: 95% CI low - base (points)"]
    assert low["value"] == pytest.approx(100 * (recipe.wilson(440, 1000)[0] - 0.40)) and low["met"]
    assert got["met"].tolist() == [True] * 5 + [True, True, True, True, False]
    only_ties = recipe.recipe_targets({n: r for n, r in table.items() if n != "task_arithmetic"})
    assert len(only_ties) == len(got) - 1 and not only_ties["criterion"].str.contains("task arithmetic").any()


def test_an_expert_replays_the_other_tasks_with_the_base_answers(smoke_experts, world, monkeypatch):
    import copy

    from mckit.build import experts
    from mckit.eval.capabilities import capability_answers

    base = load_expert("base", "full", smoke_experts)
    pool = experts.replay_pool(world, 6, 0, base)
    assert set(pool) == set(TASKS) and all(len(items) == 6 for items in pool.values())
    assert [it.answer for it in pool["vqa"]] == capability_answers(base, pool["vqa"])
    gold = experts.replay_pool(world, 6, 0)
    assert [g.image.tobytes() for g in gold["ocr"]] == [p.image.tobytes() for p in pool["ocr"]]
    seen = []
    real = experts.capability_batch
    monkeypatch.setattr(experts, "capability_batch", lambda m, items, text: seen.extend(items) or real(m, items, text))
    experts.train_capabilities(copy.deepcopy(base), world, ("chart",), "full", steps=3, batch=40, lr=1e-5, seed=0,
                               text_share=0.0, replay=0.5, pool=pool)
    replayed = [it for it in seen if it.task != "chart"]
    pooled = {id(it) for items in pool.values() for it in items}
    assert len(seen) == 120 and 30 <= len(replayed) <= 90 and all(id(it) in pooled for it in replayed)
    with pytest.raises(ValueError, match="needs a pool"):
        experts.train_capabilities(base, world, ("chart",), "full", 1, 4, 1e-5, 0, replay=0.2)
    with pytest.raises(ValueError, match="replay_labels must be 'base' or 'gold', got 'teacher'"):
        ExpertsConfig(replay_labels="teacher")
    with pytest.raises(ValueError, match=r"replay must be a share in \[0, 1\), got 1.5"):
        ExpertsConfig(replay=1.5)


def test_failed_experts_build_leaves_no_output_and_no_half_stage(tmp_path, monkeypatch):
    import mckit.build.experts as experts

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(experts, "pretrain_general_encoder", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_experts(tmp_path / "experts", config=ExpertsConfig.preset("smoke"))
    assert [p.name for p in tmp_path.iterdir()] == [".experts.stages"]
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == [".experts.stages", ".experts.stages/key.json", ".experts.stages/meta"]   # nothing finished


def test_interrupted_experts_build_resumes_to_the_same_models(tmp_path, monkeypatch):
    """Killed during its fifth training run, the build reruns only what had not finished, and every weight
    file equals an uninterrupted build's, byte for byte."""
    import mckit.build.experts as experts

    cfg = ExpertsConfig.preset("smoke")
    whole = build_experts(tmp_path / "whole", config=cfg)
    real, calls = experts.train_capabilities, []
    monkeypatch.setattr(experts, "train_capabilities", interrupted_at(real, 5, calls))
    with pytest.raises(KeyboardInterrupt):
        build_experts(tmp_path / "resumed", config=cfg)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.stages" / "models").is_dir()
    assert not list((tmp_path / ".resumed.stages").rglob("*.running"))
    calls.clear()
    monkeypatch.setattr(experts, "train_capabilities", counted(real, calls))
    resumed = build_experts(tmp_path / "resumed", config=cfg)
    assert len(calls) == 14 - 4                       # 2 base runs + 12 models; 4 had finished
    assert not (tmp_path / ".resumed.stages").exists()
    assert resumed["models"] == whole["models"] and resumed["encoder_probe"] == whole["encoder_probe"]
    weights = same_weights(tmp_path / "whole", tmp_path / "resumed")
    assert len(weights) == 2 + 12 * 2                 # the base's llm and branches, each model's two files


def test_report_section_shows_kit_beside_paper(smoke_experts):
    from mckit.report import sections

    caps = {"lora": merging_zoo.capability_table("lora", n_val=2, n_test=2, methods=["ties"],
                                                 experts_dir=smoke_experts)}
    modality = merging_zoo.modality_table("lora", n_val=4, n_test=4, methods=["ties"])
    # the shipped world holds the decoupled models: DAMC is a row (lora variant: NaiveMC is already over LoRA)
    assert set(modality) == {"single:image", "single:audio", "single:video", "naivemc", "damc", "ties"}
    text = "\n".join(sections.zoo_section({"capabilities": caps, "rank_ratio": {}, "modalities": modality,
                                            "n_val_per_task": 2, "n_test_per_task": 2, "modality_variant": "lora"}))
    kit = 100 * caps["lora"]["ties"]["test"]["mean"]["acc"]
    assert f"| ties | {kit:.2f} | 61.24 |" in text and "| optmerge |  | 63.30 |" in text
    assert "| iso_c |  | 26.69 |" in text  # reported by the paper only: blank on the kit's side
    assert "| naivemc |" in text and "66.88" in text and "| damc |" in text and "66.79" in text


def test_optimisation_check_moves_further_with_a_larger_lr(smoke_experts):
    table = merging_zoo.optimisation_check("full", lrs=(1e-5, 1e-3), experts_dir=smoke_experts)
    for _, rows in table.groupby("method"):
        assert (rows["loss_end"] < rows["loss_start"]).all()
        assert rows["moved"].iloc[1] > rows["moved"].iloc[0]
