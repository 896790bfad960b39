"""MMER's masks, expansion, retention and mask files: the formulas by hand, against TIES, and bad input."""

import numpy as np
import pytest
import torch

from mckit.compose import mmer
from mckit.compose import static as compose
from mckit.merge import methods
from mckit.merge.thresholds import global_magnitude_thresholds
from mckit.models import shipped
from mckit.models.routing import RoutedLinear
from mckit.world.render import render
from mckit.world.tasks import chat

MODS = ("image", "audio", "video", "point")
NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def base():
    return shipped.load_base()


@pytest.fixture(scope="module")
def full_models():
    return {m: shipped.load_model(m, "full") for m in MODS}


@pytest.fixture(scope="module")
def taus(full_models, base):
    return mmer.model_task_vectors(full_models, base)


@pytest.fixture(scope="module")
def masks(taus):
    return mmer.build_masks(taus, lam=[1.0, 0.6, 1.4, 0.8])


def test_mask_formula_by_hand():
    tau_i = torch.tensor([0.3, -0.2, 0.05, 0.4, 0.0, -0.1])
    star = torch.tensor([0.4, 0.2, 0.2, -0.4, 0.0, -0.1])
    # sign agrees: T F T F T(0 == 0) T; |tau_i| >= 0.5 * |tau*|: T T F T T T
    assert mmer.modality_mask(tau_i, star, 1.0).tolist() == [True, False, False, False, True, True]
    # lambda 2: |tau_i| >= |tau*|: F T F T T T
    assert mmer.modality_mask(tau_i, star, 2.0).tolist() == [False, False, False, False, True, True]
    assert mmer.modality_mask(tau_i, star, 1.0, sign_test=False).tolist() == [True, True, False, True, True, True]
    assert mmer.modality_mask(tau_i, star, 1.0, magnitude_test=False).tolist() == [True, False, True, False, True,
                                                                                   True]


def test_merged_task_vector_is_ties(taus, base):
    theta_0 = base.state_dict()[NAME]
    thetas = [theta_0 + t[NAME] for t in taus.values()]
    star, trimmed = mmer.merged_task_vector(list(taus.values()), keep=0.8)
    torch.testing.assert_close(star[NAME], methods.ties(theta_0, thetas, keep=0.8) - theta_0, atol=1e-7, rtol=0)
    kept = (trimmed[0][NAME] != 0).float().mean().item()
    assert 0.79 <= kept <= 0.81
    # global scope: one threshold per model over every tensor, the same as TIES with global thresholds
    star_g, _ = mmer.merged_task_vector(list(taus.values()), keep=0.3, scope="global")
    ref = {n: base.state_dict()[n] for n in star_g}
    thr = global_magnitude_thresholds(ref, [{n: ref[n] + t[n] for n in ref} for t in taus.values()], 0.3)
    torch.testing.assert_close(star_g[NAME], methods.ties(theta_0, thetas, thresholds=thr) - theta_0, atol=1e-7,
                               rtol=0)


def test_trimmed_option_reads_the_trimmed_task_vectors(taus):
    plain = mmer.build_masks(taus, keep=0.5)
    cut = mmer.build_masks(taus, keep=0.5, trimmed=True)
    star, trimmed = mmer.merged_task_vector(list(taus.values()), keep=0.5)
    want = mmer.modality_mask(trimmed[1][NAME], star[NAME], 1.0)
    assert torch.equal(cut.masks["audio"][NAME], want)
    live = star[NAME] != 0          # where tau* is 0 a mask bit changes nothing (m * tau* = 0)
    narrower = cut.masks["audio"][NAME][live] & ~plain.masks["audio"][NAME][live]
    assert not narrower.any()       # a trimmed-away entry (0) fails the sign test against a nonzero tau*
    assert cut.masks["audio"][NAME][live].sum() < plain.masks["audio"][NAME][live].sum()


def test_expansion_routes_each_modality_through_its_mask(full_models, base, masks):
    composed = mmer.expand(full_models, base, masks)
    mean = masks.mean_mask()
    w0 = base.state_dict()
    layer = composed.llm.get_submodule(NAME.removesuffix(".weight"))
    assert isinstance(layer, RoutedLinear)
    torch.testing.assert_close(layer.weight, w0[NAME] + mean[NAME] * masks.tau_star[NAME])   # text route
    for mod, route in composed.route_ids.items():
        want = (masks.masks[mod][NAME].float() - mean[NAME]) * masks.tau_star[NAME]
        torch.testing.assert_close(layer.deltas[str(route)].dense(), want)   # W0 + m_i tau* on mod's tokens


def test_all_ones_masks_give_ties_everywhere(full_models, base, taus):
    ones = mmer.build_masks(taus, sign_test=False, magnitude_test=False)
    expanded = mmer.expand(full_models, base, ones)
    ties = compose.with_llm(compose.add_deltas(base, ones.tau_star), full_models)
    assert not any(isinstance(m, RoutedLinear) for m in expanded.modules())
    world = shipped.load_world()
    rng = np.random.default_rng(0)
    batch = ties.batch([chat(" ".join(f"{m} : <{m}> ." for m in MODS) + " what is this ?")],
                       [{m: [render(m, world, world.entities[k], "high", rng)] for k, m in enumerate(MODS)}])
    torch.testing.assert_close(expanded(batch).logits, ties(batch).logits, atol=1e-5, rtol=1e-4)


def test_retention_model_is_base_plus_masked_merge(full_models, base, masks):
    kept = mmer.retain(full_models["video"], base, masks)
    assert kept.modalities == ["video"]
    state = kept.llm.state_dict()
    torch.testing.assert_close(state[NAME], base.state_dict()[NAME] + masks.masks["video"][NAME] *
                               masks.tau_star[NAME])
    assert torch.equal(state["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])


def test_pack_round_trip_and_storage(masks, base):
    for shape in [(1,), (3, 5), (7, 9, 2)]:
        m = torch.rand(shape) > 0.5
        packed = mmer.pack(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
        assert torch.equal(mmer.unpack(packed, shape), m)
    with pytest.raises(ValueError, match="cannot hold"):
        mmer.unpack(torch.zeros(2, dtype=torch.uint8), (30,))
    sizes = mmer.storage_bytes(masks, base)
    n_params = sum(t.numel() for t in masks.tau_star.values())
    assert sizes["masks"] == 4 * ((128 * 128 + 7) // 8 * 16 + (128 * 384 + 7) // 8 * 12)
    assert sizes["masks"] * 8 >= 4 * n_params and sizes["tau_star"] == 4 * n_params
    assert sizes["mmer"] < sizes["separate_models"]


def test_mask_file_round_trip(tmp_path, masks, taus):
    path = mmer.save_masks(masks, tmp_path / "masks.safetensors")
    loaded = mmer.load_masks(path, taus)
    assert loaded.modalities == masks.modalities and loaded.options == masks.options
    assert loaded.fingerprint == masks.fingerprint
    for mod in MODS:
        assert all(torch.equal(loaded.masks[mod][n], masks.masks[mod][n]) for n in masks.tau_star)
    assert all(torch.equal(loaded.tau_star[n], masks.tau_star[n]) for n in masks.tau_star)
    assert path.stat().st_size < sum(t.numel() for t in masks.tau_star.values()) * (4 + 4 / 8) + 20_000
    with pytest.raises(FileExistsError, match="already exists"):
        mmer.save_masks(masks, path)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]      # nothing else written


def test_masks_of_other_models_are_refused(tmp_path, masks, taus, full_models, base):
    path = mmer.save_masks(masks, tmp_path / "m.safetensors")
    other = {m: {n: t * 1.01 for n, t in tau.items()} for m, tau in taus.items()}
    with pytest.raises(ValueError, match="other task vectors"):
        mmer.load_masks(path, other)
    shapes = {m: {n: t[:, :5] for n, t in tau.items()} for m, tau in taus.items()}
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\..*masks built for other models"):
        mmer.load_masks(path, shapes)
    three = {m: full_models[m] for m in MODS[:3]}
    with pytest.raises(ValueError, match="build masks from the composed models"):
        mmer.expand(three, base, masks)
    with pytest.raises(ValueError, match="no point mask"):
        mmer.retain(full_models["point"], base, mmer.build_masks({m: taus[m] for m in MODS[:2]}))


def test_bad_mask_files(tmp_path, taus):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not an MMER mask file"):
        mmer.load_masks(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        mmer.load_masks(junk)
    with pytest.raises(FileNotFoundError, match="no mask file"):
        mmer.load_masks(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("lam, message", [(0.0, r"lam\[0\] = 0.0 is outside \(0, 2\]"),
                                          (2.5, r"outside \(0, 2\]"), (float("nan"), "not a finite number"),
                                          ([1.0, 1.0], "2 coefficients lam for 4 models")])
def test_bad_lambda(taus, lam, message):
    with pytest.raises(ValueError, match=message):
        mmer.build_masks(taus, lam=lam)


@pytest.mark.parametrize("keep", [0.0, 1.5, float("nan")])
def test_bad_keep(taus, keep):
    with pytest.raises(ValueError, match=r"K \(keep\) must be in \(0, 1\]"):
        mmer.build_masks(taus, keep=keep)


def test_bad_scope(taus):
    with pytest.raises(ValueError, match="scope must be one of"):
        mmer.build_masks(taus, scope="layer")


def test_partner_task_is_new_to_every_model_and_in_the_vocabulary():
    from mckit.world.tasks import MODALITY_TASKS, PARTNER_SHIFT, TEXT_TASKS, Slots, partner

    world = shipped.load_world()
    rng = np.random.default_rng(0)
    for _ in range(40):
        slots = Slots("audio", rng)
        ex = partner(world, rng, slots)
        (index, _level), = slots.inputs["audio"]
        assert ex.answer == world.entities[(index + PARTNER_SHIFT) % len(world.entities)].name != world.names[index]
    tokenizer = shipped.load_model("audio", "full").tokenizer
    text = chat(ex.prompt, ex.answer).replace("<audio>", "")      # the placeholder is the kit's, not a word
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    seen = [task(world, rng, Slots(mod, rng)).prompt for mod, table in ((None, TEXT_TASKS), ("image", MODALITY_TASKS))
            for task in table.values() for _ in range(20)]
    assert not any("lives" in prompt for prompt in seen)


def test_forgetting_protocol_trains_only_the_llm_and_reports_every_system():
    from mckit.experiments import mmer as experiments

    out = experiments.mmer_forgetting("audio", steps=3, n=8)
    assert out["modality"] == "audio" and out["steps"] == 3 and len(out["losses"]) == 1
    assert set(out["new"]) == {"original", "fine_tuned", "mmer", "naivemc", "mask_on_own_vector"}
    assert set(out["old"]) == set(MODS) and set(out["old"]["audio"]) >= {"original", "fine_tuned", "mmer"}
    assert out["new_vs_fine_tuned"]["fine_tuned"] in (1.0, None)         # None: the fine-tuned model scored 0
    frame = experiments.forgetting_frame(out)
    assert list(frame["system"]) == ["original", "fine_tuned", "mmer", "mmer:before", "naivemc", "mask_on_own_vector"]


def test_naive_fine_tuning_moves_the_llm_linears_only(full_models):
    import copy

    from mckit.models.training import FeatureBank, train_new_task
    from mckit.world.render import TRAIN_RENDER_SEED, render_bank
    from mckit.world.tasks import partner

    world = shipped.load_world()
    model = copy.deepcopy(full_models["point"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = FeatureBank(model.branches["point"], render_bank("point", world, 8, TRAIN_RENDER_SEED))
    train_new_task(model, "point", world, bank, partner, 2, batch_size=4)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(mmer.routable(k) for k in moved), sorted(moved)[:5]


def test_mmer_split_scores_every_system_with_lambdas_from_validation(monkeypatch):
    from mckit.experiments import mmer as experiments
    from mckit.experiments.composition import Systems

    monkeypatch.setattr(experiments, "LAMBDA_GRID", (0.6, 1.0))          # a small search: the mechanics only
    ticks = []
    out = experiments.mmer_split(Systems("full"), "MCUB-4", n=4, n_tune=2, tick=ticks.append)
    assert set(out["results"]) == {"letter", "named_letter", "option_score"}
    assert list(out["results"]["option_score"]) == ["naivemc", *experiments.MMER_SYSTEMS]
    assert all(r["n"] == 4 and 0 <= r["acc"] <= 1 for p in out["results"].values() for r in p.values())
    assert len(out["lambdas"]["mmer_tuned"]["lam"]) == 4 and out["lambdas"]["ta_dare"]["lam"] in experiments.LAMBDAS
    assert 0 < len(ticks) <= experiments.split_steps("MCUB-4")
    table = experiments.lambda_table({"MCUB-4": out})
    assert list(table.columns[:4]) == list(MODS) and set(table.loc["MCUB-4", list(MODS)]) <= {0.6, 1.0}
