"""DAMC on the toy world (METHODS.md 3): its systems on MCUB, lambdas chosen on validation, retention, conflict.

Systems (built by :class:`mckit.experiments.composition.Systems`), beside NaiveMC over the same
splits:

- ``damc``                 text LoRAs averaged (lambda_i = 1/N), modality LoRAs kept;
- ``damc_tuned``           lambda_i per modality chosen on the split's validation items
                           (:func:`tune_lambdas`: coordinate ascent over :data:`LAMBDA_GRID`);
- ``damc_fallback``        lambda_i from each decoupled model's own held-out single-modality score,
                           the paper's choice without a validation set (:func:`fallback_lambdas`);
- ``damc_ties``            TIES instead of averaging the text LoRAs;
- ``damc_inference_only``  NaiveMC's LoRA models, decoupled at inference only: text on the averaged
                           LoRAs, each input on its own model's LoRA (no decoupled training).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from mckit.eval.mcub import SPLITS, load_benchmark, subsets, write_test_splits
from mckit.eval.protocols import NAMED_LETTER, OPTION_SCORE, PROTOCOLS, evaluate_items, wilson
from mckit.experiments.composition import (
    Systems,
    _no_tick,
    describe_conflict,
    every_split,
    mcub_frame,
    retention,
    single_answers,
    single_task_results,
)
from mckit.models.shipped import DECOUPLED, has_model, load_world, model_dir_name, replica_seeds, replicas_record

#: The DAMC systems of the tables, in display order (NaiveMC is shown beside them).
DAMC_SYSTEMS = ("damc", "damc_tuned", "damc_fallback", "damc_ties", "damc_inference_only")
#: Values each modality's lambda may take in :func:`tune_lambdas`.
LAMBDA_GRID = (0.1, 0.25, 0.5, 0.75, 1.0)
#: Numbers of composed modalities of :func:`damc_by_count`, and the systems it compares.
COUNTS = (2, 3, 4)
COUNT_SYSTEMS = ("naivemc", "damc")


def has_decoupled(modalities: Iterable[str], world_dir: str | Path | None = None, seed: int = 0) -> bool:
    """Whether the world holds a decoupled model of every one of ``modalities`` for training ``seed``."""
    return all(has_model(m, DECOUPLED, world_dir, seed) for m in modalities)


def tune_lambdas(systems: Systems, modalities: tuple[str, ...], val: list, protocol: str = OPTION_SCORE,
                 grid: Iterable[float] = LAMBDA_GRID, tick: Callable[[str], None] = _no_tick,
                 system: str = "damc_tuned", start: float | None = None) -> dict:
    """Per-modality lambdas for ``system`` (``damc_tuned``, ``mmer_tuned``) by coordinate ascent on ``val``
    (never test).

    Start at lambda_i = ``start`` (default 1/N); for each modality in turn, try every ``grid`` value with the
    others fixed and keep the best (a tie keeps the current value). One pass, 1 + N * |grid|
    compositions (fewer: the current value is not scored twice). Returns ``{"lam": [...],
    "val": best score, "trace": [{"modality", "lam", "score"}, ...]}``.
    """
    n = len(modalities)
    first = 1.0 / n if start is None else float(start)
    lams = [first] * n
    scored: dict[tuple[float, ...], float] = {}

    def score(candidate: list[float]) -> float:
        key = tuple(round(v, 6) for v in candidate)
        if key not in scored:
            scored[key] = evaluate_items(systems.build(system, modalities, candidate), val, protocol)["acc"]
            tick(f"lambdas {key}")
        return scored[key]

    best = score(lams)
    trace = [{"modality": "all", "lam": first, "score": best}]
    for i, mod in enumerate(modalities):
        for value in grid:
            candidate = lams[:i] + [float(value)] + lams[i + 1:]
            s = score(candidate)
            trace.append({"modality": mod, "lam": float(value), "score": s})
            if s > best:
                best, lams = s, candidate
    return {"lam": lams, "val": best, "trace": trace}


def tuning_steps(modalities: tuple[str, ...], grid: Iterable[float] = LAMBDA_GRID) -> int:
    """The most compositions :func:`tune_lambdas` scores (progress bars' totals)."""
    return 1 + len(modalities) * len(tuple(grid))


def fallback_lambdas(modalities: tuple[str, ...], world_dir: str | Path | None = None, seed: int = 0) -> list[float]:
    """lambda_i = s_i / sum_j s_j, s_i the decoupled model i's mean held-out accuracy over its own tasks
    (recorded when it was built, ``replicas.json``): the paper's choice when the target task has no
    validation set."""
    record = replicas_record(world_dir)
    scores = []
    for mod in modalities:
        name = model_dir_name(mod, DECOUPLED, seed)
        if name not in record["models"]:
            raise FileNotFoundError(f"no held-out record of {name} in replicas.json; build it with "
                                    f"`python -m mckit build-seeds --variant decoupled --seeds {seed}`")
        scores.append(float(np.mean([r["acc"] for r in record["models"][name].values()])))
    return [s / sum(scores) for s in scores]


def damc_split(systems: Systems, split: str, n: int | None = None, n_tune: int | None = None,
               protocols: tuple[str, ...] = PROTOCOLS, bench_dir: str | Path | None = None,
               tick: Callable[[str], None] = _no_tick) -> dict:
    """NaiveMC and every DAMC system on the first ``n`` test items of ``split``; lambdas tuned on its first
    ``n_tune`` validation items under option scoring (the protocol every system answers).

    ``{"results": {protocol: {system: result}}, "lambdas": {"tuned": {...}, "fallback": [...]}}``.
    """
    mods = SPLITS[split]
    test = load_benchmark(split, "test", bench_dir)[:n]
    val = load_benchmark(split, "val", bench_dir)[:n_tune]
    tuned = tune_lambdas(systems, mods, val, tick=tick)
    fallback = fallback_lambdas(mods, systems.world_dir, systems.seed)
    lams = {"damc_tuned": tuned["lam"], "damc_fallback": fallback}
    out: dict[str, dict] = {p: {} for p in protocols}
    for name in ("naivemc", *DAMC_SYSTEMS):
        model = systems.build("damc_tuned" if name == "damc_fallback" else name, mods, lams.get(name))
        for protocol in protocols:
            out[protocol][name] = evaluate_items(model, test, protocol)
        tick(name)
    return {"results": out, "lambdas": {"tuned": tuned, "fallback": fallback}}


def split_steps(split: str) -> int:
    """Progress steps of :func:`damc_split`."""
    return tuning_steps(SPLITS[split]) + 1 + len(DAMC_SYSTEMS)


def damc_results(n: int | None = None, n_tune: int | None = None, splits: Iterable[str] = SPLITS,
                 variant: str = "lora", seed: int = 0, world_dir: str | Path | None = None,
                 bench_dir: str | Path | None = None) -> dict:
    """:func:`damc_split` for every split, with one progress bar: ``{split: damc_split(...)}``."""
    systems = Systems(variant, world_dir, seed=seed)
    return every_split(lambda split, tick: damc_split(systems, split, n, n_tune, bench_dir=bench_dir, tick=tick),
                       split_steps, splits, "DAMC on MCUB")


def damc_by_count(n: int | None = None, variant: str = "lora", seed: int = 0, world_dir: str | Path | None = None,
                  bench_dir: str | Path | None = None,
                  protocols: tuple[str, ...] = (OPTION_SCORE, NAMED_LETTER)) -> dict:
    """NaiveMC and DAMC (1/N) composed of 2, 3 and 4 modalities, on the first ``n`` test items (None: as many as
    MCUB-4 has) of every MCUB-k split of each k: the shipped MCUB-3 and MCUB-4, and the six pairs, written for
    the run into a temporary folder by the benchmark's own generator (:func:`mckit.eval.mcub.write_test_splits`).
    ``protocols``: option scoring and the letter the reply names (the first character is never the letter on
    this world: its models answer with the word first).

    ``{"splits": {split: {"k": k, "results": {protocol: {system: result}}}},
    "by_count": {protocol: {k: {system: {"acc", "ci95", "n"}}}}}``: each k pools the items of its splits.
    """
    systems = Systems(variant, world_dir, seed=seed)
    n = n or len(load_benchmark("MCUB-4", "test", bench_dir))
    splits = {split: (k, mods) for k in COUNTS for split, mods in subsets(k).items()}
    with tempfile.TemporaryDirectory(prefix="mckit-mcub2-") as tmp:
        pairs = Path(tmp) / "mcub"
        write_test_splits(pairs, load_world(world_dir), subsets(2), n)

        def run(split: str, tick: Callable[[str], None]) -> dict:
            k, mods = splits[split]
            test = load_benchmark(split, "test", pairs if k == 2 else bench_dir)[:n]
            out: dict[str, dict] = {p: {} for p in protocols}
            for name in COUNT_SYSTEMS:
                model = systems.build(name, mods)
                for protocol in protocols:
                    out[protocol][name] = evaluate_items(model, test, protocol)
                tick(name)
            return {"k": k, "results": out}

        per_split = every_split(run, lambda split: len(COUNT_SYSTEMS), splits, "NaiveMC and DAMC by modality count")
    return {"splits": per_split, "by_count": pooled_by_count(per_split)}


def pooled_by_count(per_split: dict) -> dict:
    """:func:`damc_by_count`'s splits pooled per number of modalities: correct answers over items, Wilson CI."""
    out: dict[str, dict] = {}
    for split, part in per_split.items():
        for protocol, table in part["results"].items():
            for name, r in table.items():
                cell = out.setdefault(protocol, {}).setdefault(str(part["k"]), {}).setdefault(name, [0, 0])
                cell[0] += round(r["acc"] * r["n"])
                cell[1] += r["n"]
    return {p: {k: {name: {"acc": c / t, "ci95": list(wilson(c, t)), "n": t} for name, (c, t) in row.items()}
                for k, row in by_k.items()} for p, by_k in out.items()}


def count_frame(result: dict) -> pd.DataFrame:
    """:func:`damc_by_count`'s splits as a long table: k, split, protocol, system, acc, n."""
    return pd.DataFrame([{"k": part["k"], "split": split, "protocol": p, "system": name, "acc": r["acc"], "n": r["n"]}
                         for split, part in result["splits"].items() for p, table in part["results"].items()
                         for name, r in table.items()])


def damc_frame(results: dict) -> pd.DataFrame:
    """:func:`damc_results` as :func:`~mckit.experiments.composition.mcub_frame`'s long table: protocol, split,
    system, acc, ci_low, ci_high, n."""
    protocols = next(iter(results.values()))["results"]
    return mcub_frame({p: {split: part["results"][p] for split, part in results.items()} for p in protocols})


def damc_single(variant: str = "lora", n: int | None = None, seed: int = 0, world_dir: str | Path | None = None,
                bench_dir: str | Path | None = None) -> dict:
    """Single-modality inputs through the four-modality NaiveMC and DAMC: per-task accuracy, retention (Eq. 8;
    DAMC against its own sources, the decoupled models) and the describe-it conflict.

    ``{"single": {modality: {system: {task: result}}}, "retention": {system: value}, "conflict": {...}}``.
    """
    systems = Systems(variant, world_dir, seed=seed)
    answers = single_answers(systems, SPLITS["MCUB-4"], n, bench_dir, decoupled=True)
    single = single_task_results(answers)
    return {"single": single,
            "retention": {"naivemc": retention(single, "naivemc"),
                          "damc": retention(single, "damc", original="original:decoupled"),
                          "decoupled_vs_lora": retention(single, "original:decoupled")},
            "conflict": describe_conflict(answers)}


def damc_seeds(split: str = "MCUB-4", n: int | None = None, variant: str = "lora",
               world_dir: str | Path | None = None, bench_dir: str | Path | None = None) -> pd.DataFrame:
    """NaiveMC and DAMC (1/N) on ``split`` for every training seed with both a ``variant`` and a decoupled set
    (option score): rows seed, system, acc, ci_low, ci_high, n."""
    mods = SPLITS[split]
    test = load_benchmark(split, "test", bench_dir)[:n]
    seeds = [s for s in replica_seeds(variant, world_dir) if has_decoupled(mods, world_dir, s)]
    rows = []
    for seed in seeds:
        systems = Systems(variant, world_dir, seed=seed)
        for name in ("naivemc", "damc"):
            r = evaluate_items(systems.build(name, mods), test, OPTION_SCORE)
            rows.append({"seed": seed, "system": name, "acc": r["acc"], "ci_low": r["ci95"][0],
                         "ci_high": r["ci95"][1], "n": r["n"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- why decouple, and where each token goes

def decoupled_table(world_dir: str | Path | None = None, seed: int = 0) -> pd.DataFrame:
    """Held-out accuracy (build time) of each modality's LoRA model and its decoupled twin, per task:
    rows (modality, task), columns lora, decoupled."""
    from mckit.models.shipped import world_record

    built = {**world_record(world_dir)["models"], **replicas_record(world_dir)["models"]}
    rows = {}
    for mod in world_record(world_dir)["config"]["modalities"]:
        lora, dec = built[model_dir_name(mod, "lora", seed)], built.get(model_dir_name(mod, DECOUPLED, seed), {})
        for task, r in lora.items():
            rows[(mod, task)] = {"lora": r["acc"], "decoupled": dec.get(task, {}).get("acc", float("nan"))}
    return pd.DataFrame(rows).T


def delta_interference(systems: Systems, modalities: tuple[str, ...]) -> pd.DataFrame:
    """:func:`mckit.merge.interference.interference_table` over every decoupled model's text and modality
    deltas (``"{m} text"``, ``"{m} {m}"``) and NaiveMC's LoRA task vectors (``"{m} lora"``)."""
    from mckit.merge.interference import interference_table
    from mckit.merge.task_vectors import task_vector
    from mckit.models.decoupled import decoupled_deltas

    deltas = {}
    for mod in modalities:
        split = decoupled_deltas(systems.model(mod, DECOUPLED))
        deltas[f"{mod} text"], deltas[f"{mod} {mod}"] = split["text"], split[mod]
        deltas[f"{mod} lora"] = task_vector(systems.model(mod), systems.base)
    return interference_table(deltas)


def interference_kinds(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`delta_interference` averaged over layers and over the pairs of one kind: the text deltas of two
    models (what DAMC merges), two modality deltas (kept apart), a model's text and modality deltas, and two
    LoRA task vectors (what NaiveMC merges). Rows: kind; columns: metric."""
    def kind(a: str, b: str) -> str | None:
        (ma, ra), (mb, rb) = a.split(), b.split()
        if ra == rb == "lora" and ma != mb:
            return "NaiveMC: LoRA vs LoRA (other modality)"
        if ra == rb == "text" and ma != mb:
            return "DAMC: text vs text (other modality)"
        if ra == ma and rb == mb and ma != mb:
            return "DAMC: modality vs modality"
        if ma == mb and {ra, rb} == {"text", ma}:
            return "DAMC: text vs modality (same model)"
        return None

    kinds = table.assign(kind=[kind(a, b) for a, b in zip(table["a"], table["b"])]).dropna(subset=["kind"])
    return kinds.groupby(["kind", "metric"])["value"].mean().unstack("metric")


def route_map(model, item) -> pd.DataFrame:
    """Where each position of one MCUB item's prompt goes in a routed ``model``: columns position, token
    (``<image>`` for a position holding a projected input, ``[image+]`` for a learnable embedding around it),
    route (``text`` or the modality)."""
    from mckit.eval.protocols import item_inputs
    from mckit.models.batch import PLACEHOLDER_ID
    from mckit.models.decoupled import span_of

    prompts, inputs = item_inputs(model, [item])
    batch = model.batch(prompts, inputs)
    names = {0: "text", **{route: mod for mod, route in model.route_ids.items()}}
    ids, routes = batch.input_ids[0].tolist(), batch.routes[0].tolist()
    rows, run = [], 0
    for pos, (tok, route) in enumerate(zip(ids, routes)):
        run = run + 1 if tok == PLACEHOLDER_ID else 0
        if tok == PLACEHOLDER_ID:
            mod = names[route]
            span = span_of(model.branches[mod])
            inner = span < run <= model.branches[mod].n_tokens - span
            token = f"<{mod}>" if inner else f"[{mod}+]"
        else:
            token = model.tokenizer.convert_ids_to_tokens(tok)
        rows.append({"position": pos, "token": token, "route": names[route]})
    return pd.DataFrame(rows)


def lambda_table(results: dict) -> pd.DataFrame:
    """The lambdas of :func:`damc_results` per split: rows (split, way: tuned | fallback), a column per modality,
    and the tuned ones' validation score."""
    rows = {}
    for split, part in results.items():
        mods = SPLITS[split]
        tuned, fallback = part["lambdas"]["tuned"], part["lambdas"]["fallback"]
        rows[(split, "tuned")] = {**dict(zip(mods, tuned["lam"])), "val": tuned["val"]}
        rows[(split, "fallback")] = dict(zip(mods, fallback))
    return pd.DataFrame(rows).T.round(3)


def retention_frame(single: dict) -> pd.DataFrame:
    """:func:`damc_single`'s retention (Eq. 8) as a table: system, retention, measured against."""
    against = {"naivemc": "the LoRA models", "damc": "the decoupled models",
               "decoupled_vs_lora": "the LoRA models (the decoupled models alone)"}
    return pd.DataFrame([{"system": k, "retention": v, "against": against[k]} for k, v in single["retention"].items()])


def conflict_of(single: dict, systems: tuple[str, ...] = ("naivemc", "damc")) -> dict:
    """:func:`damc_single`'s describe-it conflict restricted to ``systems``: ``{modality: {system: shares}}``."""
    return {m: {s: r for s, r in by.items() if s in systems} for m, by in single["conflict"].items()}
