"""Stored results of the slow experiments, so a notebook's default run shows the full tables in seconds.

``data/results/{name}.json`` holds one experiment's value computed at the
notebooks' full-mode settings (``python -m mckit build-cache`` writes them),
with the parameters used and a fingerprint of every input folder
(:func:`mckit.storage.fingerprint.tree_fingerprint`). A notebook in its default
mode reads a stored value only when both match what it would compute now (same
parameters, byte-identical world, experts and MCUB files); otherwise, and
always in ``MODE = "full"``, it computes. Each use prints one line saying
which it did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mckit.eval.mcub import SPLITS, default_root
from mckit.experiments import composition, damc, merging_zoo, mmer
from mckit.models.shipped import default_experts_dir, default_world_dir
from mckit.storage.atomic import atomic_write_text
from mckit.storage.fingerprint import tree_fingerprint
from mckit.storage.paths import DATA_DIR

#: Where the stored results live.
RESULTS_DIR = DATA_DIR / "results"
#: Input folder parameters and the shipped folder each defaults to.
INPUT_DIRS: dict[str, Callable[[], Path]] = {"world_dir": default_world_dir, "experts_dir": default_experts_dir,
                                             "bench_dir": default_root}
#: Parameters that do not change a result (where it runs).
NEUTRAL = frozenset({"device"})
#: The parameters each experiment's value was last obtained with by :func:`run` (stored or computed).
_USED: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class Experiment:
    """A slow computation whose value can be stored: ``fn(**full, **inputs)`` is what the cache holds."""

    fn: Callable[..., Any]
    full: dict[str, Any]              # the notebooks' full-mode parameters (also what build-cache computes)
    inputs: tuple[str, ...]           # the input folders it reads, keys of INPUT_DIRS
    notebook: str                     # the notebook whose cells use it


EXPERIMENTS: dict[str, Experiment] = {
    "capability_tables": Experiment(merging_zoo.capability_tables, {"regimes": ["full", "lora"], "n_val": 40,
                                    "n_test": 200}, ("experts_dir", "world_dir"), "05_merging_zoo"),
    "rank_ablation": Experiment(merging_zoo.rank_ablation, {"regime": "full", "n_val": 40, "n_test": 200},
                                ("experts_dir", "world_dir"), "05_merging_zoo"),
    "modality_table": Experiment(merging_zoo.modality_table, {"variant": "full", "n_val": 100, "n_test": None},
                                 ("world_dir", "bench_dir"), "05_merging_zoo"),
    "mcub_results": Experiment(composition.mcub_results, {"variant": "lora", "n": None, "splits": list(SPLITS)},
                               ("world_dir", "bench_dir"), "06_mcub"),
    "mcub_seeds": Experiment(composition.seed_records, {"variant": "lora", "n": None}, ("world_dir", "bench_dir"),
                             "06_mcub"),
    "damc_results": Experiment(damc.damc_results, {"n": None, "n_tune": None, "splits": list(SPLITS)},
                               ("world_dir", "bench_dir"), "03_damc"),
    "damc_single": Experiment(damc.damc_single, {"n": None}, ("world_dir", "bench_dir"), "03_damc"),
    "damc_seeds": Experiment(damc.damc_seeds, {"n": None}, ("world_dir", "bench_dir"), "03_damc"),
    "damc_by_count": Experiment(damc.damc_by_count, {"n": None}, ("world_dir", "bench_dir"), "03_damc"),
    "mmer_results": Experiment(mmer.mmer_results, {"n": None, "n_tune": None, "splits": list(SPLITS)},
                               ("world_dir", "bench_dir"), "04_mmer"),
    "mmer_single": Experiment(mmer.mmer_single, {"n": None}, ("world_dir", "bench_dir"), "04_mmer"),
    "mmer_sensitivity": Experiment(mmer.mmer_sensitivity, {"n": 200}, ("world_dir", "bench_dir"), "04_mmer"),
    "mmer_forgetting": Experiment(mmer.mmer_forgetting, {"modality": mmer.FORGET_MODALITY,
                                  "steps": mmer.FORGET_STEPS, "n": None},
                                  ("world_dir", "bench_dir"), "04_mmer"),
}


def _plain(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples as lists, keys as strings): what stored values compare as."""
    return json.loads(json.dumps(obj))


def _experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown stored experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def key(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a stored value must match: the parameters (input folders and neutral ones left out) and the
    fingerprint of each input folder the experiment reads."""
    exp = _experiment(name)
    folders = {k: Path(params.get(k) or INPUT_DIRS[k]()) for k in exp.inputs}
    return {"params": _plain({k: v for k, v in sorted(params.items()) if k not in INPUT_DIRS and k not in NEUTRAL}),
            "inputs": {k: tree_fingerprint(p) for k, p in folders.items()}}


def path(name: str, results_dir: str | Path | None = None) -> Path:
    return Path(results_dir or RESULTS_DIR) / f"{name}.json"


def read(name: str, results_dir: str | Path | None = None) -> dict | None:
    """The stored record of ``name`` (``{"params", "inputs", "value", "seconds", "created"}``), or None."""
    file = path(name, results_dir)
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg}, line {err.lineno}); rebuild it with "
                         f"`python -m mckit build-cache --only {name}`") from None
    missing = {"params", "inputs", "value", "seconds", "created"} - set(record) if isinstance(record, dict) else {"*"}
    if missing:
        raise ValueError(f"{file}: not a stored result (missing {', '.join(sorted(missing))})")
    return record


def lookup(name: str, params: dict[str, Any], results_dir: str | Path | None = None) -> tuple[dict | None, str]:
    """The stored record computed with ``params`` on today's inputs, or None and the reason there is none."""
    record = read(name, results_dir)
    if record is None:
        return None, f"nothing stored at {path(name, results_dir)}"
    want = key(name, params)
    if record["params"] != want["params"]:
        return None, f"stored with other parameters ({record['params']})"
    changed = [k for k, v in want["inputs"].items() if record["inputs"].get(k) != v]
    if changed:
        return None, f"the inputs changed since it was stored ({', '.join(changed)})"
    return record, ""


def compute(name: str, **params) -> tuple[Any, float]:
    """``fn(**params)`` and its wall seconds."""
    start = time.perf_counter()
    value = _experiment(name).fn(**params)
    return value, round(time.perf_counter() - start, 1)


def store(name: str, value: Any, params: dict[str, Any], seconds: float,
          results_dir: str | Path | None = None) -> Path:
    """Write the record of ``name`` atomically (temp file + rename)."""
    record = {**key(name, params), "seconds": seconds, "created": time.strftime("%Y-%m-%d"),
              "value": _plain(_encode(value))}
    return atomic_write_text(path(name, results_dir), json.dumps(record, indent=1) + "\n")


def _encode(value: Any) -> Any:
    return {"frame": value.to_dict(orient="records")} if isinstance(value, pd.DataFrame) else value


def _decode(value: Any) -> Any:
    return pd.DataFrame(value["frame"]) if isinstance(value, dict) and set(value) == {"frame"} else value


def run(name: str, mode: str, *, full: dict[str, Any], smoke: dict[str, Any], results_dir: str | Path | None = None,
        **common) -> Any:
    """One slow experiment as a notebook runs it: ``fn(**common, **full)`` in full mode; otherwise the value
    stored for exactly those parameters and inputs when there is one, else ``fn(**common, **smoke)``.

    Prints one line: where the value comes from.
    """
    if mode != "full":
        record, why = lookup(name, {**common, **full}, results_dir)
        _USED[name] = {**common, **(full if record is not None else smoke)}
        if record is not None:
            print(f"{name}: stored full run ({_show(full)}; {record['seconds']:.0f} s when computed on "
                  f"{record['created']}), read from {_shown(path(name, results_dir))}: same parameters, "
                  "same input files; MODE = \"full\" recomputes it")
            return _decode(record["value"])
        print(f"{name}: computed now at the smaller default size ({_show(smoke)}): {why}")
        return compute(name, **common, **smoke)[0]
    _USED[name] = {**common, **full}
    return compute(name, **common, **full)[0]


def _shown(file: Path) -> str:
    """``file`` relative to the repository when it lies inside it."""
    try:
        return str(file.resolve().relative_to(DATA_DIR.parent))
    except ValueError:
        return str(file)


def _show(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


#: How far a recomputation may land from a stored accuracy: 1% of the items (at least one). Float sums run
#: in another order on another CPU or thread count, and an item whose two best answers nearly tie can flip.
FLIP_SHARE = 0.01


def side_by_side(stored: dict[str, Any], now: dict[str, Any]) -> pd.DataFrame:
    """A stored result beside the same thing recomputed now.

    Both map a label to an evaluation result (``{"acc", "n", ...}``) or to a plain number (a chosen
    lambda). Rows: label; columns: stored, now, n, items_apart (|difference| in items; numbers: 0 or
    1 for equal or not).
    """
    rows = {}
    for label, before in stored.items():
        after = now[label]
        if isinstance(before, dict):
            rows[label] = {"stored": before["acc"], "now": after["acc"], "n": before["n"],
                           "items_apart": round(abs(before["acc"] - after["acc"]) * before["n"])}
        else:
            rows[label] = {"stored": before, "now": after, "n": None, "items_apart": int(before != after)}
    frame = pd.DataFrame(rows).T
    return frame.astype({"stored": float, "now": float, "n": "Int64", "items_apart": int})


def agrees(frame: pd.DataFrame) -> bool:
    """Whether a :func:`side_by_side` frame agrees: numbers equal, accuracies within :data:`FLIP_SHARE` of n."""
    numbers = frame["n"].isna()
    allowed = frame.loc[~numbers, "n"].map(lambda n: max(1, int(FLIP_SHARE * n))).astype(int)
    return bool((frame.loc[numbers, "items_apart"] == 0).all()
                and (frame.loc[~numbers, "items_apart"] <= allowed).all())


def used(name: str) -> dict[str, Any]:
    """The parameters :func:`run` last obtained ``name``'s value with."""
    if name not in _USED:
        raise ValueError(f"{name!r} has not been run yet in this session: run its table first")
    return _USED[name]


def recheck_method(tables: dict[str, dict], regime: str = "full", method: str = "task_arithmetic") -> pd.DataFrame:
    """One merging method's row of :func:`merging_zoo.capability_tables` recomputed now, beside the one shown."""
    params = used("capability_tables")
    now = merging_zoo.method_row(regime, method, params["n_val"], params["n_test"], params.get("experts_dir"),
                                 params.get("world_dir"))
    return side_by_side(merging_zoo.row_results(tables[regime][method]), merging_zoo.row_results(now))


def recheck_system(results: dict[str, dict], systems: composition.Systems, split: str = "MCUB-4",
                   system: str = "naivemc") -> pd.DataFrame:
    """One system's MCUB result (both protocols) recomputed now, beside the one shown."""
    params = used("mcub_results")
    shown = {p: results[p][split][system] for p in results}
    now = composition.system_result(systems, system, split, next(iter(shown.values()))["n"], tuple(shown),
                                    params.get("bench_dir"))
    return side_by_side(shown, now)
