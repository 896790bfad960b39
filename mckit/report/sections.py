"""REPORT.md's sections: Markdown tables of the MCUB results, the seeds, the conflict, DAMC, MMER and the zoo."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def _acc(r: dict) -> str:
    return f"{r['acc']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def mcub_table(table: dict[str, dict[str, dict]], protocol: str) -> list[str]:
    """Markdown: systems as rows, splits as columns, acc [95% CI]."""
    splits = list(table)
    systems = list(dict.fromkeys(name for split in splits for name in table[split]))
    n = {s: next(iter(table[s].values()))["n"] for s in splits}
    lines = [f"Protocol: `{protocol}`; n per split: " + ", ".join(f"{s} {n[s]}" for s in splits) + ".", "",
             "| system | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for name in systems:
        cells = [_acc(table[s][name]) if name in table[s] else "" for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def seed_section(rows: list[dict]) -> list[str]:
    """Markdown: MCUB-4 option-score accuracy per system and training seed, with the spread across seeds."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="system", columns="seed", values="acc", sort=False)
    table.columns = [f"seed {c}" for c in table.columns]
    table["spread"] = table.max(axis=1) - table.min(axis=1)
    gaps = frame.dropna(subset=["gap_points"]) if "gap_points" in frame else frame.iloc[:0]
    lines = ["", "### Across training seeds of the single-modality models (MCUB-4, option score)", ""]
    lines += markdown(table, 3)
    if len(gaps):
        lines += ["", "NaiveMC minus the best single model, per seed (points): "
                  + ", ".join(f"seed {int(r.seed)}: {r.gap_points:+.1f}" for r in gaps.itertuples()) + "."]
    return lines


def conflict_table(conflict: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown: per modality and system, the share of "describe it" answers that follow each meaning."""
    lines = ["", '### Conflict or dilution? Whose meaning of "describe it" the answers follow', "",
             "| modality | system | own | another modality's | invalid | n |", "|---|---|---|---|---|---|"]
    for mod, by_system in conflict.items():
        lines += [f"| {mod} | {name} | {r['own']:.2f} | {r['other']:.2f} | {r['invalid']:.2f} | {r['n']} |"
                  for name, r in by_system.items()]
    return lines


def markdown(frame: "pd.DataFrame", digits: int = 2) -> list[str]:
    """A DataFrame as Markdown table lines (index first; missing values left blank)."""
    import pandas as pd

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| | " + " | ".join(map(str, frame.columns)) + " |", "|---" * (len(frame.columns) + 1) + "|"]
    lines += [f"| {idx} | " + " | ".join(cell(v) for v in row) + " |" for idx, row in zip(frame.index, frame.values)]
    return lines


def zoo_section(zoo: dict) -> list[str]:
    """REPORT.md: the merging benchmark beside the paper (capabilities, rank ratio, modality merging)."""
    from mckit.experiments import merging_zoo, recipe

    lines = ["## The merging-algorithm zoo (capability experts, test items, exact match)", "",
             f"Mean accuracy (%) over the five capability tasks ({zoo['n_test_per_task']} test items per task; "
             f"lambda chosen on {zoo['n_val_per_task']} validation items per task). Paper: "
             + "; ".join(f"{r}: {m}" for r, m in merging_zoo.PAPER["capabilities_models"].items()) + ".", ""]
    lines += markdown(merging_zoo.capability_summary(zoo["capabilities"]))
    if zoo.get("geometry"):
        lines += ["", "How far the models moved (||tau|| / ||theta_0||) and how alike the experts' task vectors are:",
                  ""]
        lines += markdown(recipe.geometry_summary(zoo["geometry"]), 3)
    lines += ["", "What merging needs from the experts (`met`: the target holds on these experts):", ""]
    lines += markdown(recipe.targets_table(zoo["capabilities"]), 3)
    for regime, table in zoo["capabilities"].items():
        lines += ["", f"Per task, {regime} fine-tuning:", ""]
        lines += markdown(merging_zoo.task_table(merging_zoo.capability_frame(table, regime)), 3)
    if zoo.get("rank_ratio"):
        lines += ["", "### OptMerge rank ratio (full fine-tuning, mean %)", ""]
        lines += markdown(merging_zoo.rank_summary(zoo["rank_ratio"]))
    lines += ["", f"### Modality merging ({zoo['modality_variant']} models, {merging_zoo.MODALITY_SPLIT}, "
                  "option score, %; paper: mean of MUSIC-AVQA and AVQA)", ""]
    lines += markdown(merging_zoo.modality_summary(zoo["modalities"]))
    return lines + [""]


def damc_section(part: dict) -> list[str]:
    """REPORT.md: DAMC's systems beside NaiveMC on every split (every protocol), the lambdas, retention, the
    describe-it conflict and the seeds."""
    import pandas as pd

    from mckit.experiments import damc

    lines = ["## DAMC (decoupled LoRAs, routed composition)", "",
             "NaiveMC and the DAMC systems over the same LoRA training seed; test items, 95% Wilson CI. The "
             "paper's modality-merging table has DAMC at 66.79 beside NaiveMC 66.88 (average of MUSIC-AVQA and "
             "AVQA, 7B).", ""]
    tables = {split: p["results"] for split, p in part["mcub"].items()}
    for protocol in next(iter(tables.values())):
        lines += mcub_table({split: t[protocol] for split, t in tables.items()}, protocol) + [""]
    lines += ["Lambdas of the text LoRAs (tuned: on validation, option score; fallback: from each decoupled "
              "model's own held-out score):", ""]
    lines += markdown(damc.lambda_table(part["mcub"]), 3)
    lines += ["", "Retention (Eq. 8) on the modalities' own tasks, four-modality composition:", ""]
    lines += markdown(damc.retention_frame(part["single"]).set_index("system"), 3)
    lines += conflict_table(damc.conflict_of(part["single"]))
    if part.get("seeds"):
        seeds = pd.DataFrame(part["seeds"]).pivot_table(index="system", columns="seed", values="acc", sort=False)
        lines += ["", "MCUB-4 (option score) per training seed:", ""] + markdown(seeds, 3)
    if part.get("by_count"):
        rows = [{"protocol": p, "modalities": int(k), "system": name, "acc": r["acc"],
                 "ci95": f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}", "n": r["n"]}
                for p, by_k in part["by_count"].items() for k, table in by_k.items() for name, r in table.items()]
        lines += ["", "Composed of 2, 3 and 4 modalities (every split of that size pooled; the pairs are the kit's):",
                  ""] + markdown(pd.DataFrame(rows).set_index(["protocol", "modalities", "system"]), 3)
    return lines + [""]


#: The MMER paper's numbers (METHODS.md 5; 7B models, %): expansion average, retention (accuracies), densities.
PAPER_MMER = {"expansion": {"naivemc": 53.23, "task_arithmetic": 53.90, "ties": 54.10, "ta_dare": 54.27,
                            "ties_dare": 54.57, "mmer_tuned": 56.82, "mmer": 54.02, "mmer:no_sign": 7.20,
                            "mmer:no_magnitude": 33.87},
              "retention": {"naivemc": 88.3, "ta_dare": 91.4, "mmer": 99.4},
              "density": {"audio": 2.2, "point": 43.8, "video": 15.7, "image": 34.1}}


def mmer_section(part: dict) -> list[str]:
    """REPORT.md: MMER's systems on every split (every protocol) beside the paper, the lambdas, retention, the
    describe-it conflict, the K x lambda sweep, forgetting, mask densities and storage."""
    import pandas as pd

    from mckit.experiments import damc, mmer

    paper = ", ".join(f"{k} {v}" for k, v in PAPER_MMER["expansion"].items())
    lines = ["## MMER (one TIES-merged task vector, one binary mask per modality)", "",
             "NaiveMC and the merges over the same full fine-tunes; test items, 95% Wilson CI. Paper (expansion, "
             f"average of its benchmarks, 7B; `mmer` is its lambda = 1 ablation): {paper}.", ""]
    tables = {split: p["results"] for split, p in part["mcub"].items()}
    for protocol in next(iter(tables.values())):
        lines += mcub_table({split: t[protocol] for split, t in tables.items()}, protocol) + [""]
    lines += ["Lambdas chosen on validation (option score): MMER's per modality, TA + DARE's one:", ""]
    lines += markdown(mmer.lambda_table(part["mcub"]), 3)
    frame = mmer.retention_frame(part["single"]).set_index("system")
    frame["paper (accuracies, %)"] = [PAPER_MMER["retention"].get(s) for s in frame.index]
    lines += ["", "Retention (Eq. 8) on the modalities' own tasks, systems built over the four modalities:", ""]
    lines += markdown(frame, 3)
    lines += conflict_table(damc.conflict_of(part["single"], ("naivemc", "ties", "mmer", "mmer:expansion")))
    sweep = pd.DataFrame(part["sensitivity"])
    for metric in ("expansion", "retention"):
        table = sweep.pivot_table(index="keep", columns="threshold_pct", values=metric)
        table.columns = [f"{c:g}%" for c in table.columns]
        lines += ["", f"Sensitivity, {metric} (rows K, columns lambda * 50%; paper: best near K 60-80%, "
                      "30-45%):", ""] + markdown(table, 3)
    forgetting = part["forgetting"]
    lines += ["", f"Forgetting: the {forgetting['modality']} model fine-tuned "
                  f"{forgetting['steps']} steps on the new task (paper: old tasks keep 98-99%, the new task 98-100% "
                  "of the fine-tuned model):", ""]
    lines += markdown(mmer.forgetting_frame(forgetting).set_index("system"), 3)
    density = ", ".join(f"{m} {d:.1%} (paper {PAPER_MMER['density'].get(m, float('nan')):.1f}%)"
                        for m, d in part["density"].items())
    storage = part["storage"]
    lines += ["", f"Mask densities (K 0.8, lambda 1): {density}.", "",
              f"Storage: base {storage['base'] / 2**20:.2f} MiB + tau* {storage['tau_star'] / 2**20:.2f} MiB + masks "
              f"{storage['masks'] / 2**20:.3f} MiB = {storage['mmer'] / 2**20:.2f} MiB, against "
              f"{storage['separate_models'] / 2**20:.2f} MiB for the separate models."]
    return lines + [""]


def real_section(part: dict) -> list[str]:
    """REPORT.md: notebook 07's run on real (or the kit's tiny random) checkpoints."""
    kind = ("tiny random checkpoints written by the kit: the mechanics ran, the number means nothing"
            if part["random_checkpoints"] else "real checkpoints")
    return ["## Real checkpoints (notebook 07)", "",
            f"{part['split']}, {part['n']} items, {part['method']} (lambda {part['lam']}), {part['device']}: "
            f"accuracy {part['acc']:.3f} [{part['ci95'][0]:.2f}, {part['ci95'][1]:.2f}] ({kind}).", ""]
