"""``python -m mckit reproduce --mode {smoke,full} --out DIR``: run every notebook, collect the numbers.

Each notebook runs under papermill with ``MODE`` injected; executed copies are
kept in ``DIR/notebooks``. ``DIR/results.json`` and ``DIR/REPORT.md`` gather
the numbers (fractions in 0..1, each with n and a 95% interval). Outputs are
written atomically: a failed run leaves the previous ``DIR`` untouched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_dir
from .zoo import accuracy_table, world_record

ROOT = Path(__file__).resolve().parent.parent


def notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def run_notebooks(out: Path, mode: str) -> dict[str, float]:
    """Execute every notebook with papermill into ``out``; returns wall seconds per notebook."""
    import papermill

    seconds = {}
    for nb in tqdm(notebooks(), desc="notebooks"):
        start = time.perf_counter()
        papermill.execute_notebook(str(nb), str(out / nb.name), parameters={"MODE": mode}, cwd=str(nb.parent),
                                   kernel_name="python3", progress_bar=False)
        seconds[nb.stem] = round(time.perf_counter() - start, 1)
    return seconds


def collect(mode: str, seconds: dict[str, float]) -> dict:
    """results.json: the build record's held-out single-task accuracies, per model and task."""
    record = world_record()
    single: dict[str, dict] = {}
    for row in accuracy_table(record).itertuples():
        single.setdefault(row.modality, {}).setdefault(row.variant, {})[row.task] = {
            "acc": row.acc, "ci95": [row.ci_low, row.ci_high], "n": row.n, "chance": row.chance,
            "protocol": "exact_match"}
    return {"mode": mode, "seeds": [record["seed"]], "single_tasks": single, "notebook_seconds": seconds,
            "world_build_seconds": record["seconds"]}


def report(results: dict) -> str:
    """REPORT.md: a table of every model's held-out single-modality accuracy, chance beside it."""
    lines = [f"# mckit results ({results['mode']} mode, seeds {results['seeds']})", "",
             "## Single-modality MLLMs of the toy world (held-out renders, exact match, 95% Wilson CI)", "",
             "| modality | variant | task | acc | 95% CI | n | chance |", "|---|---|---|---|---|---|---|"]
    for mod, variants in results["single_tasks"].items():
        for variant, tasks in variants.items():
            for task, r in tasks.items():
                lines.append(f"| {mod} | {variant} | {task} | {r['acc']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}"
                             f" | {r['n']} | {r['chance']:.3f} |")
    lines += ["", "## Executed notebooks", ""]
    lines += [f"- [{name}](notebooks/{name}.ipynb): {s:.0f} s" for name, s in results["notebook_seconds"].items()]
    return "\n".join(lines) + "\n"


def reproduce(out: str | Path, mode: str = "full", overwrite: bool = True) -> dict:
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / "notebooks").mkdir()
        results = collect(mode, run_notebooks(tmp / "notebooks", mode))
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        (tmp / "REPORT.md").write_text(report(results))
    return results


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="run every notebook with papermill and write results.json + REPORT.md")
    p.add_argument("--mode", default="full", choices=["smoke", "full"])
    p.add_argument("--out", default="results")
    p.set_defaults(func=lambda args: reproduce(args.out, args.mode) and 0)
