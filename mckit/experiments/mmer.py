"""MMER on the toy world (METHODS.md 5): its systems on MCUB, lambdas chosen on validation, retention, sensitivity.

Every system here merges the world's **full fine-tunes** (MMER's setting), beside NaiveMC over the same
models (built by :class:`mckit.experiments.composition.Systems`):

- ``mmer``               expansion with lambda_i = 1 (the masks' plain formula; the paper's "lambda = 1");
- ``mmer_tuned``         lambda_i per modality chosen on the split's validation items (coordinate ascent
                         over :data:`LAMBDA_GRID`, :func:`mckit.experiments.damc.tune_lambdas`);
- ``mmer:no_sign``,      the ablations: a mask without the sign test, or without the magnitude test;
  ``mmer:no_magnitude``
- ``ties``, ``ties_dare``, ``ta_dare``: the static merges the paper compares with (TIES at K = 0.8 is
  MMER's own theta*; ``ta_dare``'s lambda chosen on validation like task arithmetic's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from mckit.compose import mmer
from mckit.compose import static as compose
from mckit.eval.mcub import SPLITS, load_benchmark
from mckit.eval.protocols import OPTION_SCORE, PROTOCOLS, evaluate_items, generated_answers
from mckit.experiments.composition import (
    LAMBDAS,
    Systems,
    _no_tick,
    choose_lambda,
    describe_conflict,
    every_split,
    mcub_frame,
    retention,
    single_task_results,
)
from mckit.experiments.damc import tune_lambdas
from mckit.merge.task_vectors import task_vector

#: The MMER table's systems, in display order (NaiveMC over the same full fine-tunes is shown first).
MMER_SYSTEMS = ("mmer", "mmer_tuned", "mmer:no_sign", "mmer:no_magnitude", "ties", "ties_dare", "ta_dare")
#: Values each modality's lambda may take in the tuning (the test keeps |tau_i| >= lambda * 50% * |tau*|).
LAMBDA_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
#: TIES's K (fraction kept) in the sensitivity sweep.
KEEP_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)
#: Task arithmetic's lambda (with and without DARE) in the retention table.
RETENTION_TA_LAMBDA = 0.3
LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


def mmer_split(systems: Systems, split: str, n: int | None = None, n_tune: int | None = None,
               protocols: tuple[str, ...] = PROTOCOLS, bench_dir: str | Path | None = None,
               tick: Callable[[str], None] = _no_tick) -> dict:
    """NaiveMC and every MMER system on the first ``n`` test items of ``split``; ``mmer_tuned``'s lambdas and
    ``ta_dare``'s chosen on its first ``n_tune`` validation items (option score).

    ``{"results": {protocol: {system: result}}, "lambdas": {"mmer_tuned": {...}, "ta_dare": {...}}}``.
    """
    mods = SPLITS[split]
    test = load_benchmark(split, "test", bench_dir)[:n]
    val = load_benchmark(split, "val", bench_dir)[:n_tune]
    tuned = tune_lambdas(systems, mods, val, grid=LAMBDA_GRID, tick=tick, system="mmer_tuned", start=1.0)
    ta_lam, ta_val = choose_lambda(systems, mods, val, (OPTION_SCORE,), tick=tick, system="ta_dare")[OPTION_SCORE]
    lams = {"mmer_tuned": tuned["lam"], "ta_dare": ta_lam}
    out: dict[str, dict] = {p: {} for p in protocols}
    for name in ("naivemc", *MMER_SYSTEMS):
        model = systems.build(name, mods, lams.get(name))
        for protocol in protocols:
            out[protocol][name] = evaluate_items(model, test, protocol)
        tick(name)
    return {"results": out, "lambdas": {"mmer_tuned": tuned, "ta_dare": {"lam": ta_lam, "val": ta_val}}}


def split_steps(split: str) -> int:
    """Progress steps of :func:`mmer_split` (at most: tuning may score fewer compositions)."""
    return 1 + len(SPLITS[split]) * len(LAMBDA_GRID) + len(LAMBDAS) + 1 + len(MMER_SYSTEMS)


def mmer_results(n: int | None = None, n_tune: int | None = None, splits: Iterable[str] = SPLITS,
                 world_dir: str | Path | None = None, bench_dir: str | Path | None = None) -> dict:
    """:func:`mmer_split` for every split, with one progress bar: ``{split: mmer_split(...)}``."""
    systems = Systems("full", world_dir)
    return every_split(lambda split, tick: mmer_split(systems, split, n, n_tune, bench_dir=bench_dir, tick=tick),
                       split_steps, splits, "MMER on MCUB")


def mmer_frame(results: dict) -> pd.DataFrame:
    """:func:`mmer_results` as a long table: protocol, split, system, acc, ci_low, ci_high, n."""
    protocols = next(iter(results.values()))["results"]
    return mcub_frame({p: {split: part["results"][p] for split, part in results.items()} for p in protocols})


def lambda_table(results: dict) -> pd.DataFrame:
    """The lambdas :func:`mmer_results` chose per split: MMER's per modality (and their validation score),
    ``ta_dare``'s one."""
    rows = {}
    for split, part in results.items():
        tuned = part["lambdas"]["mmer_tuned"]
        rows[split] = {**dict(zip(SPLITS[split], tuned["lam"])), "mmer_val": tuned["val"],
                       "ta_dare": part["lambdas"]["ta_dare"]["lam"]}
    return pd.DataFrame(rows).T


# --------------------------------------------------------------------------- one modality's input: retention

RETAINED = ("mmer", "mmer:no_sign", "mmer:no_magnitude")


def retention_models(systems: Systems, modalities: tuple[str, ...], ta_lam: float = RETENTION_TA_LAMBDA) -> dict:
    """``{modality: {system: model}}`` for single-modality inputs: the original full fine-tune, the static merges
    over ``modalities`` (NaiveMC, task arithmetic and TA + DARE at ``ta_lam``, TIES), MMER's retention model
    theta_0 + m_i * tau* (and its ablations), and MMER's expansion model as it is (``mmer:expansion``)."""
    composed = {"naivemc": systems.build("naivemc", modalities),
                "task_arithmetic": systems.build("task_arithmetic", modalities, ta_lam),
                "ta_dare": systems.build("ta_dare", modalities, ta_lam), "ties": systems.build("ties", modalities),
                "mmer:expansion": systems.build("mmer", modalities)}
    masks = {name: systems.masks(name, modalities) for name in RETAINED}
    out = {}
    for mod in modalities:
        source = systems.model(mod, "full")
        out[mod] = {"original": source, **composed,
                    **{name: mmer.retain(source, systems.base, m) for name, m in masks.items()}}
    return out


def mmer_single(n: int | None = None, ta_lam: float = RETENTION_TA_LAMBDA, world_dir: str | Path | None = None,
                bench_dir: str | Path | None = None) -> dict:
    """Each modality's own test items (the first ``n``) through every system of :func:`retention_models` over
    the four modalities: per-task accuracy, retention (Eq. 8, against the full fine-tunes), describe-it conflict.

    ``{"single": {modality: {system: {task: result}}}, "retention": {system: value}, "conflict": {...}}``.
    """
    systems = Systems("full", world_dir)
    answers = {}
    for mod, models in retention_models(systems, SPLITS["MCUB-4"], ta_lam).items():
        items = load_benchmark(f"single/{mod}", "test", bench_dir)[:n]
        answers[mod] = {"items": items, "answers": {name: generated_answers(m, items) for name, m in models.items()}}
    single = single_task_results(answers)
    names = [s for s in next(iter(single.values())) if s != "original"]
    return {"single": single, "retention": {s: retention(single, s) for s in names},
            "conflict": describe_conflict(answers)}


def retention_frame(single: dict) -> pd.DataFrame:
    """:func:`mmer_single`'s retention as rows system, retention."""
    return pd.DataFrame([{"system": k, "retention": v} for k, v in single["retention"].items()])


# --------------------------------------------------------------------------- sensitivity and masks

def mmer_sensitivity(n: int | None = 200, lams: Iterable[float] = LAMBDA_GRID, keeps: Iterable[float] = KEEP_GRID,
                     world_dir: str | Path | None = None, bench_dir: str | Path | None = None) -> pd.DataFrame:
    """The paper's sweep of lambda * 50% against K: for every pair, MMER's expansion on MCUB-4 (option score,
    first ``n`` test items) and its retention on each modality's first ``n`` test items. A sweep shown, not a
    choice: nothing is picked from it.

    Rows: keep, lam, threshold_pct (lambda * 50), expansion, retention, density (mean over modalities).
    """
    from tqdm.auto import tqdm

    systems = Systems("full", world_dir)
    mods = SPLITS["MCUB-4"]
    sources = systems.sources(mods, "full")
    taus = mmer.model_task_vectors(sources, systems.base)
    test = load_benchmark("MCUB-4", "test", bench_dir)[:n]
    single = {m: load_benchmark(f"single/{m}", "test", bench_dir)[:n] for m in mods}
    original = {m: generated_answers(sources[m], single[m]) for m in mods}
    grid = [(k, lam) for k in keeps for lam in lams]
    rows = []
    for keep, lam in tqdm(grid, desc="MMER sensitivity (K, lambda)"):
        masks = mmer.build_masks(taus, keep=keep, lam=lam)
        expansion = evaluate_items(mmer.expand(sources, systems.base, masks), test, OPTION_SCORE)["acc"]
        answers = {m: {"items": single[m], "answers": {"original": original[m], "mmer": generated_answers(
            mmer.retain(sources[m], systems.base, masks), single[m])}} for m in mods}
        scored = single_task_results(answers)
        rows.append({"keep": keep, "lam": lam, "threshold_pct": 50 * lam, "expansion": expansion,
                     "retention": retention(scored, "mmer"),
                     "density": sum(masks.density().values()) / len(mods)})
    return pd.DataFrame(rows)


def mask_steps(taus: dict, name: str, keep: float = mmer.KEEP, lam: float = 1.0, size: int = 12) -> dict:
    """MMER's steps on the top-left ``size`` x ``size`` corner of one weight ``name``, for drawing: tau*, and per
    modality tau_i, its sign test, its magnitude test and the mask (numpy arrays); plus every mask's density over
    the whole model at these settings.

    ``{"name", "keep", "lam", "tau_star": (s, s), "steps": {modality: {"tau", "sign", "magnitude", "mask"}},
    "density": {modality: share}}``.
    """
    if name not in next(iter(taus.values())):
        raise ValueError(f"no weight {name!r} in the task vectors; e.g. {next(iter(next(iter(taus.values()))))!r}")
    masks = mmer.build_masks(taus, keep=keep, lam=lam)
    star = masks.tau_star[name][:size, :size]
    steps = {}
    for mod, tau in taus.items():
        t = tau[name][:size, :size].float()
        steps[mod] = {"tau": t.numpy(), "sign": mmer.modality_mask(t, star, lam, magnitude_test=False).numpy(),
                      "magnitude": mmer.modality_mask(t, star, lam, sign_test=False).numpy(),
                      "mask": masks.masks[mod][name][:size, :size].numpy()}
    return {"name": name, "keep": keep, "lam": lam, "tau_star": star.numpy(), "steps": steps,
            "density": masks.density()}


def density_frame(masks: mmer.Masks) -> pd.DataFrame:
    """Share of parameters each modality's mask keeps, per layer and linear: columns modality, layer, module,
    density."""
    rows = []
    for mod in masks.modalities:
        for name, m in masks.masks[mod].items():
            found = LAYER.search(name)
            if found:
                rows.append({"modality": mod, "layer": int(found.group(1)), "module": found.group(2),
                             "density": float(m.float().mean())})
    return pd.DataFrame(rows)


def storage_table(masks: mmer.Masks, base) -> pd.DataFrame:
    """:func:`mckit.compose.mmer.storage_bytes` as rows part, bytes, MiB."""
    sizes = mmer.storage_bytes(masks, base)
    return pd.DataFrame([{"part": k, "bytes": v, "MiB": v / 2**20} for k, v in sizes.items()])


# --------------------------------------------------------------------------- forgetting

#: The forgetting protocol's defaults: the modality whose model learns the new task, and how long.
FORGET_MODALITY, FORGET_STEPS = "image", 200


def forgetting_models(systems: Systems, modality: str, tuned, key: str) -> tuple[dict, dict]:
    """The systems of the forgetting protocol, as ``({modality: {system: model}}, {system: model})`` for the
    old tasks (every modality) and the new task (``modality``'s input): the original models; the naively
    fine-tuned one (``fine_tuned``); MMER with masks rebuilt over five task vectors (``mmer``) and as it was
    over four (``mmer:before``, old tasks only); NaiveMC over the five (``naivemc``). New task only: the new
    mask on the fine-tuned model's own task vector, theta_0 + m_new * tau_new (``mask_on_own_vector``), which
    tells the mask's selection from tau*'s values."""
    mods = SPLITS["MCUB-4"]
    sources = systems.sources(mods, "full")
    taus = mmer.model_task_vectors(sources, systems.base)
    new_tau = task_vector(tuned, systems.base)
    five = mmer.build_masks({**taus, key: new_tau})
    four = mmer.build_masks(taus)
    naive = compose.add_deltas(systems.base, compose.merged_deltas([*taus.values(), new_tau], 1.0 / (len(mods) + 1)))
    own = compose.add_deltas(systems.base, {n: m * new_tau[n].float() for n, m in five.masks[key].items()})
    old = {}
    for mod, source in sources.items():
        old[mod] = {"original": source, "mmer": mmer.retain(source, systems.base, five),
                    "mmer:before": mmer.retain(source, systems.base, four),
                    "naivemc": compose.with_llm(naive, {mod: source}),
                    **({"fine_tuned": tuned} if mod == modality else {})}
    new = {"original": sources[modality], "fine_tuned": tuned, "mmer": mmer.retain(tuned, systems.base, five, key),
           "naivemc": compose.with_llm(naive, {modality: tuned}),
           "mask_on_own_vector": compose.with_llm(own, {modality: tuned})}
    return old, new


def mmer_forgetting(modality: str = FORGET_MODALITY, steps: int = FORGET_STEPS, n: int | None = None,
                    world_dir: str | Path | None = None, bench_dir: str | Path | None = None) -> dict:
    """MMER's forgetting protocol (METHODS.md 5): ``modality``'s full model fine-tuned ``steps`` steps on the
    partner task (:func:`mckit.world.tasks.partner`, new to every model), its task vector added, TIES and every
    mask rebuilt. Old tasks: each modality's first ``n`` single-modality test items; new task: ``n`` (200 when
    None) held-out partner questions on test renders.

    ``{"old": {modality: {system: {task: result}}}, "new": {system: result}, "old_retention": {system: Eq. 8 over
    every modality}, "old_retention_modality": {system: Eq. 8 over ``modality``}, "new_vs_fine_tuned": {...},
    "losses": [...], "steps", "modality"}``.
    """
    import copy

    from mckit.eval.protocols import predict, score
    from mckit.models.shipped import load_world
    from mckit.models.training import FeatureBank, train_new_task
    from mckit.world.render import TEST_RENDER_SEED, TRAIN_RENDER_SEED, render_bank
    from mckit.world.tasks import Slots, partner

    systems = Systems("full", world_dir)
    world = load_world(world_dir)
    tuned = copy.deepcopy(systems.model(modality, "full"))
    branch = tuned.branches[modality]
    losses = train_new_task(tuned, modality, world, FeatureBank(branch, render_bank(modality, world, 64,
                            TRAIN_RENDER_SEED)), partner, steps)
    old_models, new_models = forgetting_models(systems, modality, tuned, f"{modality}+partner")
    answers = {}
    for mod, models in old_models.items():
        items = load_benchmark(f"single/{mod}", "test", bench_dir)[:n]
        answers[mod] = {"items": items, "answers": {s: generated_answers(m, items) for s, m in models.items()}}
    old = single_task_results(answers)
    rng = np.random.default_rng([0, 61])
    examples = [partner(world, rng, Slots(modality, rng)) for _ in range(n or 200)]
    bank = FeatureBank(branch, render_bank(modality, world, 16, TEST_RENDER_SEED))
    new = {s: score(examples, predict(m, examples, {modality: bank}))["partner"] for s, m in new_models.items()}
    kept = ("mmer", "mmer:before", "naivemc")
    return {"old": old, "new": new,
            "old_retention": {s: retention(old, s) for s in kept},
            "old_retention_modality": {s: retention({modality: old[modality]}, s) for s in (*kept, "fine_tuned")},
            "new_vs_fine_tuned": {s: r["acc"] / new["fine_tuned"]["acc"] if new["fine_tuned"]["acc"] else None
                                  for s, r in new.items()},
            "losses": losses[::10], "steps": steps, "modality": modality}


def forgetting_frame(result: dict) -> pd.DataFrame:
    """:func:`mmer_forgetting` as one row per system: old tasks kept (all modalities; the fine-tuned modality's
    alone), new-task accuracy and its share of the fine-tuned model's."""
    rows = []
    for s in ("original", "fine_tuned", "mmer", "mmer:before", "naivemc", "mask_on_own_vector"):
        rows.append({"system": s, "old_kept_all": result["old_retention"].get(s),
                     "old_kept_modality": result["old_retention_modality"].get(s),
                     "new_acc": result["new"].get(s, {}).get("acc"),
                     "new_vs_fine_tuned": result["new_vs_fine_tuned"].get(s)})
    return pd.DataFrame(rows)
