"""The MCUB table: every system on MCUB-4 and each MCUB-3 split, single-modality retention.

Systems (keys of results.json):

- ``single:m``                  model m alone; it sees only its own modality's input
- ``frozen``                    base LLM + every stage-1 projector
- ``naivemc``                   theta_0 + mean_i tau_i, every branch
- ``task_arithmetic``           theta_0 + lambda * sum_i tau_i, lambda chosen on the split's val items
- ``control:dilution:m``        theta_0 + tau_m / N with branch m only
- ``control:all_projectors:m``  model m's LLM fed every input through its source model's projector
- ``control:frozen_stage2``     base LLM + projectors trained on the instruction data (LLM frozen)
- ``damc``, ``damc_ties``       DAMC over the decoupled models (text LoRAs averaged, or merged by TIES);
  ``damc_tuned``                with per-modality lambdas (given: chosen by :mod:`mckit.experiments.damc`);
  ``damc_inference_only``       decoupling at inference only: text on NaiveMC, each input on its own LoRA
- ``ties``, ``ties_dare``,      merges of the full fine-tunes (whatever ``variant``): TIES and DARE + TIES at
  ``ta_dare``                   MMER's K = 0.8 kept, DARE + task arithmetic (lambda given, default 1/N)
- ``mmer``, ``mmer_tuned``      MMER's expansion over the full fine-tunes, lambda = 1 or given per modality;
  ``mmer:no_sign``,             its ablations (:mod:`mckit.experiments.mmer`)
  ``mmer:no_magnitude``

Retention (Eq. 8 of MMER, METHODS.md 5): mean over (modality, task) of
acc(system) / acc(original single model) on the single-modality test sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mckit.compose import mmer
from mckit.compose import static as compose
from mckit.compose.damc import damc
from mckit.compose.routed import modality_routed
from mckit.eval.mcub import SPLITS, MCUBItem, load_benchmark
from mckit.eval.protocols import (
    OPTION_SCORE,
    PROTOCOLS,
    evaluate_items,
    exact_match_by_task,
    first_token_answers,
    generated_answers,
)
from mckit.models.mllm import MLLM
from mckit.models.shipped import DECOUPLED, load_base, load_model, replica_seeds
from mckit.world.entities import FAMILIES
from mckit.world.tasks import NATIVE_FAMILY

LAMBDAS = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
#: The static merges beside MMER: registered method and its options (TIES at MMER's K).
MERGES = {"ties": ("ties", {"keep": mmer.KEEP}), "ties_dare": ("dare_ties", {"keep": mmer.KEEP}),
          "ta_dare": ("dare_ta", {})}
#: MMER's systems and the mask options each sets (the ablations drop one test).
MMER_VARIANTS = {"mmer": {}, "mmer_tuned": {}, "mmer:no_sign": {"sign_test": False},
                 "mmer:no_magnitude": {"magnitude_test": False}}


class Systems:
    """Builds (and caches) every system over one world: source models, compositions and controls."""

    def __init__(self, variant: str = "lora", world_dir: str | Path | None = None, device: str = "cpu", seed: int = 0):
        """``seed``: the training seed of the ``variant`` models (0: the world's own; others: replicas)."""
        self.variant, self.world_dir, self.device, self.seed = variant, world_dir, device, seed
        self.base = load_base(world_dir)
        self._models: dict[tuple[str, str], MLLM] = {}

    def model(self, modality: str, variant: str | None = None) -> MLLM:
        key = (modality, variant or self.variant)
        if key not in self._models:
            seed = self.seed if key[1] in (self.variant, DECOUPLED) else 0
            self._models[key] = load_model(modality, key[1], self.world_dir, seed)
        return self._models[key]

    def sources(self, modalities: Iterable[str], variant: str | None = None) -> dict[str, MLLM]:
        return {m: self.model(m, variant) for m in modalities}

    def build(self, name: str, modalities: tuple[str, ...], lam: float | list[float] | None = None) -> MLLM:
        """The system called ``name`` over ``modalities`` (see the module docstring), on ``self.device``."""
        if name.startswith("single:"):
            model = self.model(name.removeprefix("single:"))
        elif name == "frozen":
            model = compose.frozen_compose(self.sources(modalities, "stage1"), self.base)
        elif name == "naivemc":
            model = compose.naivemc(self.sources(modalities), self.base)
        elif name == "task_arithmetic":
            model = compose.task_arithmetic_compose(self.sources(modalities), self.base, lam)
        elif name.startswith("control:dilution:"):
            model = compose.dilution_control(self.model(name.removeprefix("control:dilution:")), self.base,
                                             len(modalities))
        elif name.startswith("control:all_projectors:"):
            model = compose.all_projectors_control(self.model(name.removeprefix("control:all_projectors:")),
                                                   self.sources(modalities))
        elif name == "control:frozen_stage2":
            model = compose.frozen_compose(self.sources(modalities, "frozen"), self.base)
        elif name == "damc_inference_only":
            model = modality_routed(self.sources(modalities), self.base)
        elif name in ("damc", "damc_tuned", "damc_ties"):
            if name == "damc_tuned" and lam is None:
                raise ValueError("damc_tuned needs its lambdas (one per modality)")
            model = damc(self.sources(modalities, DECOUPLED), self.base, lam if name == "damc_tuned" else None,
                         text_method="ties" if name == "damc_ties" else "average")
        elif name in MERGES:
            method, options = MERGES[name]
            if name == "ta_dare":
                options = {"lam": 1.0 / len(modalities) if lam is None else lam}
            model = compose.method_compose(self.sources(modalities, "full"), self.base, method, **options)
        elif name in MMER_VARIANTS:
            model = mmer.expand(self.sources(modalities, "full"), self.base, self.masks(name, modalities, lam))
        else:
            raise ValueError(f"unknown system {name!r}")
        return model.to(self.device).eval()

    def masks(self, name: str, modalities: tuple[str, ...], lam=None) -> mmer.Masks:
        """MMER's masks of system ``name`` over the full fine-tunes of ``modalities`` (lambda default 1)."""
        if name == "mmer_tuned" and lam is None:
            raise ValueError("mmer_tuned needs its lambdas (one per modality)")
        return mmer.mmer_masks(self.sources(modalities, "full"), self.base, lam=1.0 if lam is None else lam,
                               **MMER_VARIANTS[name])


def system_names(modalities: tuple[str, ...]) -> list[str]:
    """Every system of the table for a split over ``modalities``, in display order."""
    return ([f"single:{m}" for m in modalities] + ["frozen", "naivemc", "task_arithmetic"]
            + [f"control:dilution:{m}" for m in modalities]
            + [f"control:all_projectors:{m}" for m in modalities] + ["control:frozen_stage2"])


def every_split(run: Callable[[str, Callable[[str], None]], dict], steps: Callable[[str], int],
                splits: Iterable[str], desc: str) -> dict:
    """``{split: run(split, tick)}`` for every split under one progress bar; ``tick(label)`` advances it one step
    and ``steps(split)`` is the most steps ``run`` makes on ``split`` (the bar jumps there when it made fewer)."""
    from tqdm.auto import tqdm

    splits = list(splits)
    out, done = {}, 0
    with tqdm(total=sum(steps(s) for s in splits), desc=desc) as bar:
        for split in splits:
            def tick(label: str, split: str = split) -> None:
                bar.set_postfix_str(f"{split} {label}", refresh=False)
                bar.update()

            out[split] = run(split, tick)
            done += steps(split)
            bar.update(done - bar.n)
    return out


def _no_tick(label: str) -> None:
    """Default progress callback: nothing."""


def choose_lambda(systems: Systems, modalities: tuple[str, ...], val: list[MCUBItem],
                  protocols: tuple[str, ...] = PROTOCOLS, grid: Iterable[float] = LAMBDAS,
                  tick: Callable[[str], None] = _no_tick,
                  system: str = "task_arithmetic") -> dict[str, tuple[float, dict[float, float]]]:
    """Task arithmetic's (or ``system``'s) lambda per protocol: the grid value with the best accuracy on ``val``
    (never test).

    Ties go to the lambda nearest 1/N (plain averaging). One composition per grid value;
    ``tick(label)`` is called after each.
    """
    scores: dict[str, dict[float, float]] = {p: {} for p in protocols}
    for lam in grid:
        model = systems.build(system, modalities, lam)
        for p in protocols:
            scores[p][lam] = evaluate_items(model, val, p)["acc"]
        tick(f"val lambda={lam}")
    best = {p: max(s, key=lambda lam: (s[lam], -abs(lam - 1 / len(modalities)))) for p, s in scores.items()}
    return {p: (best[p], scores[p]) for p in protocols}


def split_steps(split: str) -> int:
    """Progress steps of :func:`run_split`: one per lambda of the grid and one per system."""
    return len(LAMBDAS) + len(system_names(SPLITS[split]))


def run_split(systems: Systems, split: str, n: int | None = None, protocols: tuple[str, ...] = PROTOCOLS,
              bench_dir: str | Path | None = None,
              tick: Callable[[str], None] = _no_tick) -> dict[str, dict[str, dict]]:
    """``{protocol: {system: {"acc", "ci95", "n", "protocol"}}}`` on the first ``n`` test items of ``split``.

    Task arithmetic's lambda is chosen on the first ``n`` validation items.
    ``tick(label)`` is called after each of the :func:`split_steps` steps.
    """
    mods = SPLITS[split]
    test = load_benchmark(split, "test", bench_dir)[:n]
    val = load_benchmark(split, "val", bench_dir)[:n]
    out: dict[str, dict[str, dict]] = {p: {} for p in protocols}
    lams = choose_lambda(systems, mods, val, protocols, tick=tick)
    for name in system_names(mods):
        for protocol in protocols:
            if protocol == protocols[0] or name == "task_arithmetic":
                model = systems.build(name, mods, lams[protocol][0])
            out[protocol][name] = evaluate_items(model, test, protocol)
            if name == "task_arithmetic":
                lam, scores = lams[protocol]
                out[protocol][name].update(lam=lam, val_acc={str(k): v for k, v in scores.items()})
        tick(name)
    return out


def run_mcub(systems: Systems, n: int | None = None, splits: Iterable[str] = SPLITS,
             bench_dir: str | Path | None = None) -> dict[str, dict[str, dict[str, dict]]]:
    """:func:`run_split` for every split: ``{protocol: {split: {system: result}}}``, with one progress bar."""
    from tqdm.auto import tqdm

    splits = list(splits)
    out: dict[str, dict[str, dict]] = {p: {} for p in PROTOCOLS}
    with tqdm(total=sum(split_steps(s) for s in splits), desc="MCUB") as bar:
        for split in splits:
            def tick(label: str, split: str = split) -> None:
                bar.set_postfix_str(f"{split} {label}", refresh=False)
                bar.update()

            for protocol, table in run_split(systems, split, n, bench_dir=bench_dir, tick=tick).items():
                out[protocol][split] = table
    return out


def mcub_results(variant: str = "lora", n: int | None = None, splits: Iterable[str] = SPLITS,
                 world_dir: str | Path | None = None, bench_dir: str | Path | None = None,
                 device: str = "cpu") -> dict[str, dict[str, dict[str, dict]]]:
    """:func:`run_mcub` over fresh :class:`Systems` of ``variant``: the whole table from parameters alone."""
    return run_mcub(Systems(variant, world_dir, device), n, splits, bench_dir)


def system_result(systems: Systems, name: str, split: str, n: int | None = None,
                  protocols: tuple[str, ...] = PROTOCOLS,
                  bench_dir: str | Path | None = None) -> dict[str, dict]:
    """One system (no lambda to choose) on the first ``n`` test items of ``split``: ``{protocol: result}``."""
    model = systems.build(name, SPLITS[split])
    test = load_benchmark(split, "test", bench_dir)[:n]
    return {p: evaluate_items(model, test, p) for p in protocols}


def mcub_frame(results: dict[str, dict[str, dict[str, dict]]]) -> pd.DataFrame:
    """Long table: protocol, split, system, acc, ci_low, ci_high, n."""
    rows = [{"protocol": p, "split": s, "system": name, "acc": r["acc"], "ci_low": r["ci95"][0],
             "ci_high": r["ci95"][1], "n": r["n"]}
            for p, splits in results.items() for s, table in splits.items() for name, r in table.items()]
    return pd.DataFrame(rows)


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """Per protocol and split: NaiveMC, the best single model, and the gap in points."""
    rows = []
    for (p, s), g in frame.groupby(["protocol", "split"], sort=False):
        acc = g.set_index("system")["acc"]
        singles = acc[acc.index.str.startswith("single:")]
        rows.append({"protocol": p, "split": s, "naivemc": acc["naivemc"], "best_single": singles.max(),
                     "best_single_system": singles.idxmax(), "gap_points": 100 * (acc["naivemc"] - singles.max())})
    return pd.DataFrame(rows)


def single_answers(systems: Systems, modalities: tuple[str, ...], n: int | None = None,
                   bench_dir: str | Path | None = None, decoupled: bool = False) -> dict[str, dict]:
    """Greedy answers on each modality's own test items (the first ``n``), once per compared system.

    ``{modality: {"items": [...], "answers": {system: [...]}}}`` for the original
    model, NaiveMC and the dilution control (``decoupled``: also DAMC and its sources, the decoupled
    models, as ``original:decoupled``); :func:`single_task_results` and :func:`describe_conflict` score them.
    """
    composed = {name: systems.build(name, modalities) for name in ("naivemc", *(("damc",) if decoupled else ()))}
    out: dict[str, dict] = {}
    for mod in modalities:
        items = load_benchmark(f"single/{mod}", "test", bench_dir)[:n]
        models = {"original": systems.build(f"single:{mod}", modalities), **composed,
                  "control:dilution": systems.build(f"control:dilution:{mod}", modalities)}
        if decoupled:
            models["original:decoupled"] = systems.model(mod, DECOUPLED)
        out[mod] = {"items": items, "answers": {name: generated_answers(m, items) for name, m in models.items()}}
    return out


def single_task_results(answers: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """``{modality: {system: {task: result}}}``: exact match of :func:`single_answers` per task."""
    return {mod: {name: exact_match_by_task(a, part["items"]) for name, a in part["answers"].items()}
            for mod, part in answers.items()}


def describe_families(answers: list[str], modality: str, modalities: tuple[str, ...]) -> dict[str, float]:
    """Which meaning of "describe it" the answers follow: fractions of ``own``, ``other`` and ``invalid``.

    "describe it" asks for a different attribute family in each modality
    (``NATIVE_FAMILY``). An answer that is a value of ``modality``'s own family is
    ``own``; a value of the family another composed modality asks for is
    ``other`` (the composed LLM followed another model's skill: conflict, not
    dilution); anything else (no single value, a value of an unasked family) is
    ``invalid``.
    """
    own = set(FAMILIES[NATIVE_FAMILY[modality]])
    other = {v for m in modalities if m != modality for v in FAMILIES[NATIVE_FAMILY[m]]} - own
    n = len(answers)
    counts = {"own": sum(a in own for a in answers), "other": sum(a in other for a in answers)}
    counts["invalid"] = n - counts["own"] - counts["other"]
    return {**{k: v / n for k, v in counts.items()}, "n": n}


def describe_conflict(answers: dict[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{modality: {system: describe_families(...)}}`` on the "describe it" items of :func:`single_answers`."""
    mods = tuple(answers)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mod, part in answers.items():
        keep = [i for i, it in enumerate(part["items"]) if it.task == "describe"]
        out[mod] = {name: describe_families([a[i] for i in keep], mod, mods) for name, a in part["answers"].items()}
    return out


def seed_table(seeds: Iterable[int], split: str = "MCUB-4", n: int | None = None, variant: str = "lora",
               world_dir: str | Path | None = None, bench_dir: str | Path | None = None) -> pd.DataFrame:
    """Every single model and NaiveMC on ``split`` (option score) for each training seed of the source models.

    Rows: seed, system, acc, ci_low, ci_high, n, plus ``gap_points`` (NaiveMC minus the
    best single model of that seed, in points) on the NaiveMC rows.
    """
    from tqdm.auto import tqdm

    mods = SPLITS[split]
    test = load_benchmark(split, "test", bench_dir)[:n]
    rows = []
    seeds = list(seeds)
    with tqdm(total=len(seeds) * (len(mods) + 1), desc=f"{split} per training seed") as bar:
        for seed in seeds:
            systems = Systems(variant, world_dir, seed=seed)
            accs = {}
            for name in [*(f"single:{m}" for m in mods), "naivemc"]:
                r = evaluate_items(systems.build(name, mods), test, OPTION_SCORE)
                accs[name] = r["acc"]
                rows.append({"seed": seed, "system": name, "acc": r["acc"], "ci_low": r["ci95"][0],
                             "ci_high": r["ci95"][1], "n": r["n"]})
                bar.update()
            rows[-1]["gap_points"] = 100 * (accs["naivemc"] - max(v for k, v in accs.items() if k != "naivemc"))
    return pd.DataFrame(rows)


def seed_frame(records: list[dict]) -> pd.DataFrame:
    """:func:`seed_records`' rows as :func:`seed_table`'s frame."""
    return pd.DataFrame(records)


def seed_records(variant: str = "lora", n: int | None = None, world_dir: str | Path | None = None,
                 bench_dir: str | Path | None = None) -> list[dict]:
    """:func:`seed_table` on MCUB-4 for every training seed the world holds a full set of ``variant`` models
    for (:func:`mckit.models.shipped.replica_seeds`), as rows (what the store keeps)."""
    seeds = replica_seeds(variant, world_dir)
    rows = seed_table(seeds, "MCUB-4", n, variant, world_dir, bench_dir).to_dict(orient="records")
    return [{k: v for k, v in row.items() if v == v} for row in rows]       # no NaN: plain JSON


def retention(single: dict[str, dict[str, dict]], system: str, original: str = "original") -> float:
    """Eq. 8: mean over (modality, task) of acc(system) / acc(original); tasks the original fails are skipped.

    ``original``: the row of the source models (``"original"``: the ``variant`` models; DAMC's are the
    decoupled ones).
    """
    ratios = [r["acc"] / single[m][original][t]["acc"]
              for m in single for t, r in single[m][system].items() if single[m][original][t]["acc"] > 0]
    return float(np.mean(ratios))


def throughput(model: MLLM, items: list[MCUBItem], batch_size: int = 128) -> dict[str, float]:
    """Items per second of the one-forward fast path and of ``generate``, and whether they agree."""
    start = time.perf_counter()
    fast = first_token_answers(model, items, batch_size)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = generated_answers(model, items, batch_size)
    t_slow = time.perf_counter() - start
    agree = float(np.mean([a[:1] == b[:1] for a, b in zip(fast, slow)]))
    return {"fast_items_per_s": len(items) / t_fast, "generate_items_per_s": len(items) / t_slow,
            "speedup": t_slow / t_fast, "agreement": agree, "n": len(items)}


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is present, else ``"cpu"``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def seed_spread(seed_frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`seed_table` as systems x seeds, with the spread (max - min) across seeds."""
    table = seed_frame.pivot_table(index="system", columns="seed", values="acc", sort=False)
    return table.assign(spread=table.max(axis=1) - table.min(axis=1))


def single_task_frame(single: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """:func:`single_task_results` as tasks x (modality, system) accuracies."""
    return pd.DataFrame({(m, s): {t: r["acc"] for t, r in tasks.items()}
                         for m, by_system in single.items() for s, tasks in by_system.items()})


def conflict_frame(conflict: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """:func:`describe_conflict` as (modality, system) rows: own, other, invalid, n."""
    return pd.DataFrame({(m, s): r for m, by_system in conflict.items() for s, r in by_system.items()}).T
