"""The merging-algorithm benchmark of the OptMerge paper, on the toy world.

Two tables, as in the paper (METHODS.md 6):

- **capabilities**: five experts fine-tuned from one base MLLM on the five
  capability tasks of :mod:`mckit.world.capabilities` (full fine-tuning and LoRA),
  merged by every method; beside them the base, each expert and a multi-task
  model (the upper bound).
- **modalities**: the world's image, audio and video models (one LLM base)
  merged by every method and evaluated on MCUB-3 image-audio-video (option
  scoring), beside each single model and NaiveMC.

Every method's global lambda is chosen on a validation split from the paper's
grid {0.1, 0.3, 0.5, 0.7, 1.0, 1.5} (never on test); weight averaging has no
lambda. Every method here is linear in lambda (theta_0 + lambda * X, X fixed by
the task vectors; ``tests/test_merge_bench.py`` checks it), so X is computed
once per method and scaled for each grid value. Only the LLM's 2-D linear
weights are merged; everything else comes from the base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch

from mckit.compose import static as compose
from mckit.eval.capabilities import eval_items, evaluate_capabilities
from mckit.eval.protocols import OPTION_SCORE, evaluate_items
from mckit.experiments.composition import LAMBDAS, Systems
from mckit.merge.registry import METHODS, for_regime, get
from mckit.merge.task_vectors import task_vector
from mckit.models.mllm import MLLM
from mckit.models.shipped import DECOUPLED, MULTITASK, has_model, load_expert, load_world
from mckit.world.capabilities import TASKS

#: Benchmark methods, in the registry's order and at its defaults, which are the paper's settings (TIES keeps
#: 20% per tensor, DARE drops 20%, seeded per tensor); on LoRA experts OptMerge runs its LoRA variant.
BENCH_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in {x.lora_variant for x in METHODS.values()})
#: WUDI and OptMerge again at a learning rate where their losses converge on the toy's small matrices (300 Adam
#: steps cut the loss 65-600x at 1e-3 against 1.6x at the paper's 1e-5; :func:`optimisation_check`): rows
#: ``"{method}@lr{lr}"``.
CONVERGED_LR = 1e-3
CONVERGED: tuple[str, ...] = ("wudi", "optmerge")
#: OptMerge rank-ratio ablation (k as a fraction of min(m, d)), as in the paper.
RANK_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


def direction(taus: list[dict[str, torch.Tensor]], base: torch.nn.Module, name: str, regime: str,
              **options) -> dict[str, torch.Tensor]:
    """X per weight: the merged delta at lambda = 1 (weight average: its delta, used as is)."""
    return compose.method_deltas(taus, base, for_regime(name, regime).name, **options)


def scaled_model(base_mllm: MLLM, deltas: dict[str, torch.Tensor], lam: float) -> MLLM:
    """theta_0 + lam * X with ``base_mllm``'s branches (the base's vision side)."""
    llm = compose.add_deltas(base_mllm.llm, {k: lam * v for k, v in deltas.items()})
    return MLLM(llm, base_mllm.tokenizer, dict(base_mllm.branches)).eval()


def choose_lambda(build: Callable[[float], MLLM], score: Callable[[MLLM], float],
                  grid: Iterable[float] = LAMBDAS) -> tuple[float, dict[float, float]]:
    """The grid value with the best validation ``score`` (ties: the smaller lambda) and every score."""
    scores = {lam: score(build(lam)) for lam in grid}
    return max(scores, key=lambda lam: (scores[lam], -lam)), scores


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


# --------------------------------------------------------------------------- capability experts

def capability_table(regime: str, n_val: int = 40, n_test: int = 200, methods: Iterable[str] = BENCH_METHODS,
                     experts_dir: str | Path | None = None, world_dir: str | Path | None = None) -> dict[str, dict]:
    """``{system: {"test": {task: result, "mean": ...}, "lam", "val"}}`` for one regime (full | lora).

    Systems: ``base``, ``expert:{task}``, ``multitask``, every method, and each of :data:`CONVERGED`
    among them once more at :data:`CONVERGED_LR` (``"wudi@lr0.001"``). ``n_val`` / ``n_test`` are items
    per task.
    """
    val, test, base, experts, taus = _capability_setup(regime, n_val, n_test, experts_dir, world_dir)
    runs = [(name, name, {}) for name in methods]
    runs += [(f"{name}@lr{CONVERGED_LR:g}", name, {"lr": CONVERGED_LR}) for name in CONVERGED if name in methods]
    out: dict[str, dict] = {}
    with _bar(len(TASKS) + 2 + len(runs), f"capabilities ({regime})") as bar:
        for name, model in [("base", base), *((f"expert:{t}", e) for t, e in zip(TASKS, experts)),
                            ("multitask", load_expert(MULTITASK, regime, experts_dir))]:
            out[name] = {"test": evaluate_capabilities(model, test)}
            if name in REFERENCES:
                out[name]["val_by_task"] = _accuracies(evaluate_capabilities(model, val))
            bar.update()
        for row, name, options in runs:
            bar.set_postfix_str(row)
            out[row] = _capability_row(base, direction(taus, base.llm, name, regime, **options), not get(name).has_lam,
                                       val, test)
            bar.update()
    return out


def _capability_setup(regime: str, n_val: int, n_test: int, experts_dir, world_dir):
    """Validation and test items (per task), the base MLLM, the five experts and their task vectors."""
    world = load_world(world_dir)
    base = load_expert("base", regime, experts_dir)
    experts = [load_expert(t, regime, experts_dir) for t in TASKS]
    taus = [task_vector(e, base.llm) for e in experts]
    return eval_items(world, "val", n_val), eval_items(world, "test", n_test), base, experts, taus


#: Rows of a capability table whose validation accuracy per task is kept too (the lambda explorer's references).
REFERENCES = ("base", "multitask")


def _accuracies(result: dict[str, dict]) -> dict[str, float]:
    """An :func:`evaluate_capabilities` result as accuracy per task (and "mean")."""
    return {task: r["acc"] for task, r in result.items()}


def _capability_row(base: MLLM, deltas: dict[str, torch.Tensor], fixed: bool, val: list, test: list) -> dict:
    """:func:`_merged_row` scored on capability items: mean validation accuracy picks lambda; the accuracy per
    task at every lambda is kept as ``val_by_lambda``."""
    def val_eval(model: MLLM) -> tuple[float, dict]:
        by_task = _accuracies(evaluate_capabilities(model, val))
        return by_task["mean"], by_task

    return _merged_row(base, deltas, fixed, val_eval, lambda m: evaluate_capabilities(m, test))


def _merged_row(base: MLLM, deltas: dict[str, torch.Tensor], fixed: bool,
                val_eval: Callable[[MLLM], tuple[float, dict | None]], test_result: Callable[[MLLM], dict]) -> dict:
    """One method's row: lambda chosen on validation (unless ``fixed``), then the test result at that lambda.

    ``val_eval(model)`` gives the validation score and, optionally, details kept per lambda.
    """
    details: dict[float, dict] = {}

    def score(lam: float) -> float:
        value, detail = val_eval(scaled_model(base, deltas, lam))
        if detail is not None:
            details[lam] = detail
        return value

    lam, scores = (1.0, {}) if fixed else choose_lambda(lambda lam: lam, score)
    row = {"lam": lam, "val": {str(k): v for k, v in scores.items()},
           "test": test_result(scaled_model(base, deltas, lam))}
    if details:
        row["val_by_lambda"] = {str(k): v for k, v in details.items()}
    return row


def method_row(regime: str, method: str, n_val: int = 40, n_test: int = 200, experts_dir: str | Path | None = None,
               world_dir: str | Path | None = None) -> dict:
    """One method's row of :func:`capability_table`, computed alone (lambda on validation, then test)."""
    val, test, base, _, taus = _capability_setup(regime, n_val, n_test, experts_dir, world_dir)
    return _capability_row(base, direction(taus, base.llm, method, regime), not get(method).has_lam, val, test)


def row_results(row: dict) -> dict:
    """A capability row's chosen lambda and its test results, flat: ``{"lambda": lam, "test {task}": result}``."""
    return {"lambda": row.get("lam"), **{f"test {t}": r for t, r in row["test"].items()}}


def rank_ablation(regime: str = "full", ratios: Iterable[float] = RANK_RATIOS, n_val: int = 40, n_test: int = 200,
                  experts_dir: str | Path | None = None, world_dir: str | Path | None = None) -> dict[str, dict]:
    """OptMerge with k = ratio * min(m, d) instead of min(m, d) // n: ``{ratio: row}`` (lambda on validation)."""
    val, test, base, _, taus = _capability_setup(regime, n_val, n_test, experts_dir, world_dir)
    out = {}
    ratios = list(ratios)
    with _bar(len(ratios), f"OptMerge rank ratio ({regime})") as bar:
        for ratio in ratios:
            deltas = direction(taus, base.llm, "optmerge", regime, rank_ratio=ratio)
            out[str(ratio)] = _capability_row(base, deltas, False, val, test)
            bar.update()
    return out


def capability_tables(regimes: Iterable[str], n_val: int = 40, n_test: int = 200,
                      experts_dir: str | Path | None = None, world_dir: str | Path | None = None) -> dict[str, dict]:
    """:func:`capability_table` of every regime: ``{regime: table}``."""
    return {r: capability_table(r, n_val, n_test, experts_dir=experts_dir, world_dir=world_dir) for r in regimes}


def capability_frames(tables: dict[str, dict]) -> pd.DataFrame:
    """Every regime's :func:`capability_frame`, stacked."""
    return pd.concat([capability_frame(t, r) for r, t in tables.items()], ignore_index=True)


def own_task_gain(record_frame: pd.DataFrame, regime: str = "full") -> pd.Series:
    """Per task: the accuracy its expert gains on it over the base (from the experts' build record)."""
    return pd.Series({t: record_frame.loc[f"{t}-{regime}", t] - record_frame.loc["base", t] for t in TASKS})


def capability_frame(table: dict[str, dict], regime: str) -> pd.DataFrame:
    """Long table: regime, system, task (five tasks and "mean"), acc, lam."""
    rows = [{"regime": regime, "system": name, "task": task, "acc": r["acc"], "lam": row.get("lam")}
            for name, row in table.items() for task, r in row["test"].items()]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- modality merging

#: The modality-merging setting: image, audio and video experts, evaluated on MCUB-3 image-audio-video.
MODALITY_SPLIT = "MCUB-3-image-audio-video"


def modality_table(variant: str = "full", n_val: int = 100, n_test: int | None = None,
                   methods: Iterable[str] = BENCH_METHODS, world_dir: str | Path | None = None,
                   bench_dir: str | Path | None = None) -> dict[str, dict]:
    """The world's image/audio/video models merged by every method: ``{system: {"test": result, "lam", "val"}}``.

    Evaluated with option scoring on MCUB-3 image-audio-video (lambda on its
    validation items). ``single:m`` sees only its own input; ``naivemc`` is
    theta_0 + mean tau (for full fine-tuning it equals weight averaging). Where the world holds the
    decoupled models, ``damc`` (their DAMC, lambda 1/N) and ``naivemc:lora`` (NaiveMC over the LoRA
    models trained on the same data) are rows too.
    """
    from mckit.eval.mcub import SPLITS, load_benchmark

    mods = SPLITS[MODALITY_SPLIT]
    systems = Systems(variant, world_dir)
    sources = systems.sources(mods)
    val = load_benchmark(MODALITY_SPLIT, "val", bench_dir)[:n_val]
    test = load_benchmark(MODALITY_SPLIT, "test", bench_dir)[:n_test]
    taus = [task_vector(m, systems.base) for m in sources.values()]
    composed = compose.with_llm(systems.base, sources)  # base LLM, every branch
    methods = list(methods)
    out: dict[str, dict] = {}
    with _bar(len(mods) + 1 + len(methods), f"modality merging ({variant})") as bar:
        for mod in mods:
            out[f"single:{mod}"] = {"test": evaluate_items(sources[mod], test, OPTION_SCORE)}
            bar.update()
        out["naivemc"] = {"test": evaluate_items(compose.naivemc(sources, systems.base), test, OPTION_SCORE)}
        bar.update()
        if all(has_model(m, DECOUPLED, world_dir) for m in mods):      # DAMC and its like-for-like NaiveMC
            lora = Systems("lora", world_dir)
            for name in ("naivemc", "damc") if variant != "lora" else ("damc",):
                label = f"{name}:lora" if name == "naivemc" else "damc"
                out[label] = {"test": evaluate_items(lora.build(name, mods), test, OPTION_SCORE)}
        for name in methods:
            bar.set_postfix_str(name)
            out[name] = _merged_row(composed, direction(taus, systems.base, name, variant), not get(name).has_lam,
                                    lambda m: (evaluate_items(m, val, OPTION_SCORE)["acc"], None),
                                    lambda m: evaluate_items(m, test, OPTION_SCORE))
            bar.update()
    return out


def modality_frame(table: dict[str, dict]) -> pd.DataFrame:
    """Rows: system, acc, ci_low, ci_high, n, lam."""
    return pd.DataFrame([{"system": name, "acc": row["test"]["acc"], "ci_low": row["test"]["ci95"][0],
                          "ci_high": row["test"]["ci95"][1], "n": row["test"]["n"], "lam": row.get("lam")}
                         for name, row in table.items()])


def lambda_linearity_error(taus: list[dict[str, torch.Tensor]], base: torch.nn.Module, name: str, regime: str,
                           lam: float = 0.5) -> float:
    """max |method(lam) - lam * method(1)| over weights: 0 when the method is linear in lambda."""
    one = direction(taus, base, name, regime)
    at = direction(taus, base, name, regime, lam=lam)
    return float(max((at[k] - lam * one[k]).abs().max() for k in one)) if one else 0.0


def task_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Systems x tasks accuracy table (with the mean) from a :func:`capability_frame`."""
    table = frame.pivot_table(index="system", columns="task", values="acc", sort=False)
    return table[[*TASKS, "mean"]]


#: The paper's reported averages (%, METHODS.md 6), keyed like the kit's systems, to show beside the kit's.
PAPER = {
    "capabilities": {
        "full": {"base": 53.66, "average": 49.12, "task_arithmetic": 56.18, "ties": 56.70, "dare_ta": 56.50,
                 "dare_ties": 56.76, "tsv": 54.37, "iso_c": 54.78, "wudi": 57.00, "optmerge": 57.44,
                 "multitask": 57.66},
        "lora": {"base": 21.82, "average": 60.55, "task_arithmetic": 60.29, "ties": 61.24, "dare_ta": 60.32,
                 "dare_ties": 61.88, "tsv": 60.63, "iso_c": 26.69, "wudi": 58.65, "optmerge": 63.30,
                 "multitask": 62.23},
    },
    "capabilities_models": {"full": "InternVL2.5-1B, full fine-tuning", "lora": "Qwen2-VL-7B, LoRA"},
    "modalities": {"single:image": 63.16, "single:audio": 37.75, "single:video": 64.11, "average": 58.57,
                   "task_arithmetic": 65.38, "ties": 63.10, "tsv": 67.34, "iso_c": 65.14, "wudi": 64.65,
                   "optmerge": 67.00, "naivemc": 66.88, "damc": 66.79},
    "rank_ratio": {"0.1": 56.93, "0.2": 57.43, "0.3": 56.63, "0.4": 54.22, "0.5": 52.98},
}


def beside_paper(kit: dict[str, float], paper: dict[str, float]) -> pd.DataFrame:
    """Rows: system; columns: the kit's accuracy (%) and the paper's, for systems either reports."""
    names = list(dict.fromkeys([*kit, *paper]))
    return pd.DataFrame({"kit": [round(100 * kit[n], 2) if n in kit else None for n in names],
                         "paper": [paper.get(n) for n in names]}, index=names)


def capability_summary(tables: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """Mean test accuracy (%) of every system per regime, beside the paper's average and its chosen lambda."""
    parts = []
    for regime, table in tables.items():
        kit = {name: row["test"]["mean"]["acc"] for name, row in table.items()}
        side = beside_paper(kit, PAPER["capabilities"][regime])
        side["lambda"] = [table[n].get("lam") if n in table else None for n in side.index]
        parts.append(side.add_prefix(f"{regime}: "))
    return pd.concat(parts, axis=1)


def rank_summary(ablation: dict[str, dict]) -> pd.DataFrame:
    """OptMerge's mean test accuracy (%) per rank ratio, beside the paper's ablation."""
    return beside_paper({r: row["test"]["mean"]["acc"] for r, row in ablation.items()}, PAPER["rank_ratio"])


def modality_summary(table: dict[str, dict]) -> pd.DataFrame:
    """MCUB-3 image-audio-video accuracy (%) of every system, beside the paper's average over MUSIC-AVQA and AVQA."""
    side = beside_paper({n: row["test"]["acc"] for n, row in table.items()}, PAPER["modalities"])
    side["lambda"] = [table[n].get("lam") if n in table else None for n in side.index]
    return side


def optimisation_check(regime: str = "full", weight: str = "model.layers.1.mlp.down_proj.weight",
                       lrs: Iterable[float] = (1e-5, 1e-4, 1e-3), experts_dir: str | Path | None = None
                       ) -> pd.DataFrame:
    """How far WUDI's and OptMerge's optimisation gets on one weight of the experts, per learning rate.

    Rows: method, lr, loss at the start and after the paper's 300 steps, and
    ||X - X_init|| / ||X_init|| (how far X moved from its initial value).
    """
    base = load_expert("base", regime, experts_dir)
    taus = [task_vector(load_expert(t, regime, experts_dir), base.llm)[weight] for t in TASKS]
    theta_0 = base.llm.state_dict()[weight].float()
    thetas = [theta_0 + t for t in taus]
    rows = []
    for name in ("wudi", "optmerge"):
        method = for_regime(name, regime)
        fn = method.fn
        init = torch.stack(taus).sum(0) if method.name != "optmerge_lora" else torch.stack(taus).mean(0)
        for lr in lrs:
            losses: list[float] = []
            X = fn(theta_0, thetas, lr=lr, losses=losses) - theta_0
            rows.append({"method": name, "lr": lr, "loss_start": losses[0], "loss_end": losses[-1],
                         "moved": float((X - init).norm() / init.norm())})
    return pd.DataFrame(rows)
