"""``python -m mckit reproduce --mode {smoke,full} --out DIR``: run every notebook, collect the numbers.

Each notebook runs under papermill with ``MODE`` injected; executed copies are
kept in ``DIR/notebooks``. ``DIR/results.json`` and ``DIR/REPORT.md`` gather
the numbers (fractions in 0..1, each with n and a 95% interval). Outputs are
written atomically: a failed run leaves the previous ``DIR`` untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from mckit.models.shipped import accuracy_table, world_record
from mckit.report.sections import (
    PAPER_MMER,
    conflict_table,
    damc_section,
    mcub_table,
    mmer_section,
    real_section,
    seed_section,
    zoo_section,
)
from mckit.storage.atomic import atomic_dir, atomic_write_text
from mckit.storage.cpus import usable_cpus
from mckit.storage.paths import NOTEBOOKS_DIR


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def _declares(nb: Path, name: str) -> bool:
    """Whether the notebook's parameters cell declares ``name``."""
    cells = json.loads(nb.read_text())["cells"]
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return any(line.startswith(f"{name} =") for c in params for line in "".join(c["source"]).splitlines())


def high_water_mib(pid: int) -> float:
    """Peak resident memory of a live process so far (Linux ``VmHWM``; elsewhere its current RSS), in MiB."""
    import psutil

    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss / 2**20


def _tree_peak(proc) -> float:
    """The largest :func:`high_water_mib` among ``proc`` and its descendants (0 for those already gone)."""
    import psutil

    peak = 0.0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return peak
    for p in tree:
        try:
            peak = max(peak, high_water_mib(p.pid))
        except (psutil.Error, ValueError):
            continue
    return peak


def run_notebook(src: Path, dst: Path, parameters: dict, poll_s: float = 0.1) -> dict[str, float]:
    """Execute one notebook with papermill in a child process; its wall seconds and peak memory.

    ``peak_mib`` is the largest resident high-water mark among the child and its descendants
    (the notebook's kernel), read every ``poll_s``: what a 2 GB Binder container must hold.
    A failing notebook raises with the tail of papermill's log.
    """
    import psutil

    cmd = [sys.executable, "-m", "papermill", str(src), str(dst), "--cwd", str(src.parent), "-k", "python3",
           "--no-progress-bar", "-y", json.dumps(parameters)]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        watched, peak = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_peak(watched))
            time.sleep(poll_s)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            text = log.read()
            cause = text[text.find("PapermillExecutionError"):] if "PapermillExecutionError" in text else text
            raise RuntimeError(f"{src.name} failed under papermill ({parameters}):\n{cause[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_mib": round(peak)}


#: The runs :func:`run_notebooks` measures per reproduce mode: the default run a student gets on a CPU
#: (``MODE = "auto"`` there means "smoke"), then, in full mode, the full run whose numbers are collected.
RUNS = {"smoke": ("smoke",), "full": ("smoke", "full")}


def run_notebooks(out: Path, mode: str, parts: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Execute every notebook into ``out``; returns ``{notebook: {run: {"seconds", "peak_mib"}}}``.

    Each notebook runs once per :data:`RUNS` of ``mode``; the executed copy of the last run is
    kept. Notebooks that declare an ``OUT`` parameter get the absolute path of ``parts`` on that
    last run and write their numbers there with :func:`write_part` (they run with the notebooks
    folder as working directory, so a relative path would land in the wrong place).
    """
    from mckit.report.explore import HEADLESS_ENV

    os.environ[HEADLESS_ENV] = "1"          # the kernels inherit it: explorers draw one static figure
    runs = RUNS[mode]
    measured: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for nb in tqdm(notebooks(), desc="notebooks"):
            for run in runs:
                last = run == runs[-1]
                params = {"MODE": run, **({"OUT": str(Path(parts).resolve())} if last and _declares(nb, "OUT") else {})}
                dst = out / nb.name if last else Path(scratch) / nb.name
                measured.setdefault(nb.stem, {})[run] = run_notebook(nb, dst, params)
    return measured


def write_part(parts: str | Path | None, name: str, obj: dict) -> Path | None:
    """Write ``obj`` as ``parts/name.json`` (temp file + rename); a no-op when ``parts`` is None.

    A notebook's ``OUT`` parameter is ``parts``: :func:`collect` merges every part
    into results.json, so a part's top-level keys become results.json's.
    """
    if parts is None:
        return None
    return atomic_write_text(Path(parts) / f"{name}.json", json.dumps(obj, indent=1))


#: The papers' numbers the kit's are shown beside (METHODS.md 5; MMER, 7B models, %).
PAPER = {"retention": {"naivemc": {"accuracies": 0.883, "scores": 0.975}}}
#: The previous world (text pretraining without the letter drill, lr 3e-3; experts trained 600 + 150 steps at
#: 1e-3 without replay), as its own `make reproduce` measured it: one line each, for comparison.
PREVIOUS_WORLD = (
    "MCUB-4 (400 items): NaiveMC 0.245 `letter`, 0.660 `option_score`; best single 0.268 / 0.448; gap -2.3 / "
    "+21.3 points (seeds 0-2: +21.3, +20.0, +17.5 under `option_score`).",
    "Every MCUB split under `letter`: every system 0.21-0.29 (chance 0.25): the base LM never bound a letter.",
    "Retention (Eq. 8): NaiveMC 0.611, dilution control 0.436.",
    "Describe-it conflict: NaiveMC follows another modality's meaning 0.70 / 0.72 / 0.64 / 0.16 of the time "
    "(image / audio / video / point).",
    "Capability merging, full FT (mean %): base 59.1, multi-task 62.1, task arithmetic 59.0 (lambda 0.1), best merge "
    "TIES / DARE-TIES 59.9; every method chose lambda 0.1.",
    "Capability merging, LoRA (mean %): base 59.1, multi-task 60.9, best merge TIES / Iso-C 59.6.",
    "Modality merging (MCUB-3 i-a-v, option score %): NaiveMC 55.5, task arithmetic 58.3, TIES 60.0.",
)


def world_models(record: dict) -> dict:
    """The build record's held-out accuracies of every single-modality model, per modality, variant, task."""
    out: dict[str, dict] = {}
    for row in accuracy_table(record).itertuples():
        out.setdefault(row.modality, {}).setdefault(row.variant, {})[row.task] = {
            "acc": row.acc, "ci95": [row.ci_low, row.ci_high], "n": row.n, "chance": row.chance,
            "protocol": "exact_match"}
    return out


def collect(mode: str, runs: dict[str, dict[str, dict[str, float]]], parts: Path) -> dict:
    """results.json: what the notebooks wrote under ``parts`` plus the world's build record."""
    record = world_record()
    results = {"mode": mode, "seeds": [record["seed"]]}
    for part in sorted(parts.glob("*.json")):
        results.update(json.loads(part.read_text()))
    results.update({"world_models": world_models(record), "paper": {**PAPER, "mmer": PAPER_MMER}, "notebook_runs": runs,
                    "world_build_seconds": record["seconds"]})
    return results


def report(results: dict) -> str:
    """REPORT.md: the MCUB tables (every protocol), retention beside the paper, the world's models, timings."""
    lines = [f"# mckit results ({results['mode']} mode, seeds {results['seeds']})", ""]
    if "mcub" in results:
        lines += ["## MCUB on the toy world (test items, 95% Wilson CI)", "",
                  "The paper's MCUB numbers are not reproduced here (7B models, real media); what carries over is "
                  "the comparison: NaiveMC against the best single-modality model on each split.", ""]
        for key, protocol in (("mcub", "letter"), ("mcub_named_letter", "named_letter"),
                              ("mcub_option_score", "option_score")):
            if key in results:
                lines += mcub_table(results[key], protocol) + [""]
        lines += ["", "| protocol | split | NaiveMC | best single | gap (points) |", "|---|---|---|---|---|"]
        lines += [f"| {h['protocol']} | {h['split']} | {h['naivemc']:.3f} | {h['best_single']:.3f} "
                  f"({h['best_single_system']}) | {h['gap_points']:+.1f} |" for h in results["headline"]]
        lines += ["", "## Retention on the modalities' own tasks (Eq. 8)", "",
                  "| system | kit (exact match) | paper (MMER, accuracies) | paper (scores) |", "|---|---|---|---|"]
        for name, value in results["retention"].items():
            paper = PAPER["retention"].get(name, {})
            lines.append(f"| {name} | {value:.3f} | {paper.get('accuracies', '')} | {paper.get('scores', '')} |")
        if "mcub_seeds" in results:
            lines += seed_section(results["mcub_seeds"])
        if "describe_conflict" in results:
            lines += conflict_table(results["describe_conflict"])
        t = results["throughput"]
        lines += ["", f"Fast path {t['fast_items_per_s']:.0f} items/s vs generate {t['generate_items_per_s']:.0f} "
                      f"items/s ({t['speedup']:.1f}x; agreement {t['agreement']:.3f} on {t['n']} items, "
                      f"device {results.get('device', 'cpu')}).", ""]
    if "damc" in results:
        lines += damc_section(results["damc"])
    if "mmer" in results:
        lines += mmer_section(results["mmer"])
    if "zoo" in results:
        lines += zoo_section(results["zoo"])
    if "real" in results:
        lines += real_section(results["real"])
    lines += ["## Single-modality MLLMs of the toy world (held-out renders, exact match, 95% Wilson CI)", "",
              "| modality | variant | task | acc | 95% CI | n | chance |", "|---|---|---|---|---|---|---|"]
    for mod, variants in results["world_models"].items():
        for variant, tasks in variants.items():
            for task, r in tasks.items():
                lines.append(f"| {mod} | {variant} | {task} | {r['acc']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}"
                             f" | {r['n']} | {r['chance']:.3f} |")
    lines += ["", "## The previous world, for comparison", ""] + [f"- {line}" for line in PREVIOUS_WORLD]
    lines += notebook_section(results["notebook_runs"], results.get("cpus"))
    return "\n".join(lines) + "\n"


def notebook_section(runs: dict[str, dict[str, dict[str, float]]], cpus: int | None = None) -> list[str]:
    """REPORT.md: wall time and peak memory of every notebook's default run (and full run), with totals."""
    kinds = list(dict.fromkeys(k for by_run in runs.values() for k in by_run))
    label = {"smoke": "default run (CPU)", "full": "full run"}
    lines = ["", "## Executed notebooks", "",
             f"Wall time and peak resident memory of the notebook's kernel ({cpus or '?'} CPU(s) usable when the "
             "run started). The default run is what a student gets on a CPU (`MODE = \"auto\"`).", "",
             "| notebook | " + " | ".join(f"{label[k]}: s | {label[k]}: peak MiB" for k in kinds) + " |",
             "|---" * (1 + 2 * len(kinds)) + "|"]
    for name, by_run in runs.items():
        cells = [f"{by_run[k]['seconds']:.0f} | {by_run[k]['peak_mib']:.0f}" if k in by_run else " | " for k in kinds]
        lines.append(f"| [{name}](notebooks/{name}.ipynb) | " + " | ".join(cells) + " |")
    totals = " | ".join(f"{sum(r[k]['seconds'] for r in runs.values() if k in r):.0f} | " for k in kinds)
    return lines + [f"| total | {totals}|"]


def reproduce(out: str | Path, mode: str = "full", overwrite: bool = True) -> dict:
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / "notebooks").mkdir()
        parts = tmp / "parts"
        cpus = usable_cpus()
        results = collect(mode, run_notebooks(tmp / "notebooks", mode, parts), parts) | {"cpus": cpus}
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        (tmp / "REPORT.md").write_text(report(results))
    return results


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="run every notebook with papermill and write results.json + REPORT.md")
    p.add_argument("--mode", default="full", choices=["smoke", "full"])
    p.add_argument("--out", default="results")
    p.set_defaults(func=lambda args: reproduce(args.out, args.mode) and 0)
