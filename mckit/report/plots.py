"""Figures (seaborn/matplotlib): the world's samples, anatomy, task-vector norms."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from mckit.models.encoders import AudioEncoder
from mckit.world.entities import MODALITIES, World
from mckit.world.render import render

sns.set_theme(style="white", context="notebook")


def draw_input(ax, modality: str, x: np.ndarray, title: str = "") -> None:
    """Draw one raw input on ``ax``: image, log spectrogram, frame strip, or 3-D point scatter."""
    if modality == "image":
        ax.imshow(np.transpose(x, (1, 2, 0)), interpolation="nearest")
    elif modality == "audio":
        spec = AudioEncoder.spectrogram(torch.from_numpy(x)[None])[0, 0].numpy()
        ax.imshow(spec, origin="lower", aspect="auto", cmap="magma")
    elif modality == "video":
        ax.imshow(np.concatenate(list(x), axis=1), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    elif modality == "point":
        ax.scatter(x[:, 0], x[:, 1], x[:, 2], c=np.clip(x[:, 3:], 0, 1), s=6)
        ax.set_zlim(-2, 2)
    else:
        raise ValueError(f"unknown modality {modality!r}")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if modality == "point":
        ax.set_zticks([])


def plot_exchange(exchange: dict, modality: str) -> plt.Figure:
    """The input of one :func:`mckit.report.notebook.ask` exchange, titled with the question and the answer."""
    fig = plt.figure(figsize=(3.2, 3.2))
    ax = fig.add_subplot(projection="3d" if modality == "point" else None)
    question = exchange["prompt"].split(f"<{modality}>")[-1].split("ASSISTANT")[0].strip()
    draw_input(ax, modality, exchange["input"], f"{exchange['entity']['name']}: {question}\n-> {exchange['answer']}")
    return fig


def plot_samples(world: World, entities: list[int], seed: int = 0, levels: tuple[str, ...] = ("high",)) -> plt.Figure:
    """One row per modality, one column per (entity, level): what each encoder sees."""
    cols = [(e, lv) for e in entities for lv in levels]
    fig = plt.figure(figsize=(2.3 * len(cols), 2.2 * len(MODALITIES)))
    rng = np.random.default_rng(seed)
    for r, mod in enumerate(MODALITIES):
        for c, (e, lv) in enumerate(cols):
            ent = world.entities[e]
            kw = {"projection": "3d"} if mod == "point" else {}
            ax = fig.add_subplot(len(MODALITIES), len(cols), r * len(cols) + c + 1, **kw)
            draw_input(ax, mod, render(mod, world, ent, lv, rng), f"{mod}: {ent.name} ({lv})")
    fig.tight_layout()
    return fig


def plot_attribute_table(world: World) -> plt.Figure:
    """Heatmap of entity x family values: every value is held by the same number of entities."""
    df = pd.DataFrame([{"entity": e.name, **e.attrs} for e in world.entities]).set_index("entity")
    codes = df.apply(lambda col: pd.Categorical(col).codes)
    fig, ax = plt.subplots(figsize=(5, 0.22 * len(df) + 1))
    sns.heatmap(codes, annot=df.values, fmt="", cbar=False, cmap="Pastel1", ax=ax, annot_kws={"fontsize": 7})
    ax.set_title("entities and their attributes")
    return fig


def plot_task_vector_norms(norms: pd.DataFrame) -> plt.Figure:
    """One heatmap per source model: layer x module Frobenius norm of its task vector.

    norms: columns ``model``, ``layer``, ``module``, ``norm``.
    """
    models = list(dict.fromkeys(norms["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 2.8), sharey=True, squeeze=False)
    vmax = norms["norm"].max()
    for ax, name in zip(axes[0], models):
        table = norms[norms["model"] == name].pivot(index="layer", columns="module", values="norm")
        sns.heatmap(table, ax=ax, vmin=0, vmax=vmax, cmap="rocket_r", cbar=ax is axes[0][-1], annot=False)
        ax.set_title(name, fontsize=10)
    fig.suptitle("||tau|| per layer and linear (Frobenius)")
    fig.tight_layout()
    return fig


def plot_anatomy(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Horizontal bars: trainable vs frozen parameters per part (log scale)."""
    long = table.melt(id_vars="part", value_vars=["trainable", "frozen"], var_name="state", value_name="n")
    long = long[long["n"] > 0]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table) + 1))
    sns.barplot(long, y="part", x="n", hue="state", ax=ax, palette={"trainable": "tab:orange", "frozen": "tab:blue"})
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_single_accuracy(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars of held-out accuracy per task and model, chance marked; columns model, task, acc, chance."""
    fig, ax = plt.subplots(figsize=(9, 3.2))
    sns.barplot(table, x="task", y="acc", hue="model", ax=ax)
    for i, (_, chance) in enumerate(table.groupby("task", sort=False)["chance"].first().items()):
        ax.hlines(chance, i - 0.4, i + 0.4, colors="k", linestyles=":", label="chance" if i == 0 else None)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def heatmap(grid: pd.DataFrame, ax, fmt: str = ".2f", fontsize: float = 7, cmap: str = "mako",
            vmin: float | None = None, vmax: float | None = None, cbar: bool = True) -> None:
    """A heatmap of ``grid`` (rows top to bottom, its index and columns as tick labels) with each cell's value
    written on it, dark on light cells and white on dark ones (seaborn's rule). Drawn with matplotlib alone:
    ``sns.heatmap`` draws the whole figure once per call to check its tick labels, so notebook 02's 16
    heatmaps in one figure took 10.6 s to build here, against 1.2 s this way."""
    values = grid.to_numpy(dtype=float)
    colours = sns.color_palette(cmap, as_cmap=True)
    mesh = ax.pcolormesh(values, cmap=colours, vmin=vmin, vmax=vmax)
    ax.set(xlim=(0, values.shape[1]), ylim=(values.shape[0], 0))
    ax.set_xticks(np.arange(values.shape[1]) + 0.5, [str(c) for c in grid.columns], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(np.arange(values.shape[0]) + 0.5, [str(r) for r in grid.index], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if cbar:
        ax.figure.colorbar(mesh, ax=ax).outline.set_linewidth(0)
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            light = sns.utils.relative_luminance(mesh.cmap(mesh.norm(value))) > 0.408
            ax.text(col + 0.5, row + 0.5, format(value, fmt), ha="center", va="center", fontsize=fontsize,
                    color=".15" if light else "w")


def plot_interference(table: pd.DataFrame) -> plt.Figure:
    """Heatmaps of modality-pair interference: one row per metric, one column per layer.

    table: :func:`mckit.merge.interference.interference_table` (columns layer, a, b, metric, value).
    """
    metrics = list(dict.fromkeys(table["metric"]))
    layers = sorted(table["layer"].unique())
    fig, axes = plt.subplots(len(metrics), len(layers), figsize=(2.4 * len(layers) + 1, 2.2 * len(metrics)),
                             squeeze=False)
    for r, metric in enumerate(metrics):
        part = table[table["metric"] == metric]
        lo, hi = part["value"].min(), part["value"].max()
        for c, layer in enumerate(layers):
            grid = part[part["layer"] == layer].pivot(index="a", columns="b", values="value")
            heatmap(grid, axes[r][c], vmin=lo, vmax=hi, cmap="mako", cbar=c == len(layers) - 1)
            axes[r][c].set_title(f"{metric} · layer {layer}", fontsize=9)
            axes[r][c].set_xlabel("")
            axes[r][c].set_ylabel("")
    fig.tight_layout()
    return fig


def _ci_bars(ax, frame: pd.DataFrame, colours: list[str], chance: float | None) -> None:
    """One bar per row (columns system, acc, ci_low, ci_high) with its 95% interval; chance dotted."""
    ax.bar(range(len(frame)), frame["acc"], color=colours,
           yerr=[frame["acc"] - frame["ci_low"], frame["ci_high"] - frame["acc"]], capsize=2)
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(frame)), frame["system"], rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")


def plot_mcub(frame: pd.DataFrame, protocol: str) -> plt.Figure:
    """Bars with 95% CIs: accuracy of every system on every split under ``protocol``, chance marked.

    frame: :func:`mckit.experiments.composition.mcub_frame`.
    """
    part = frame[frame["protocol"] == protocol]
    splits = list(dict.fromkeys(part["split"]))
    fig, axes = plt.subplots(len(splits), 1, figsize=(11, 2.6 * len(splits)), squeeze=False, sharex=False)
    for ax, split in zip(axes[:, 0], splits):
        g = part[part["split"] == split].reset_index(drop=True)
        colours = ["tab:green" if s == "naivemc" else "tab:gray" if s.startswith("control") else "tab:blue"
                   for s in g["system"]]
        _ci_bars(ax, g, colours, 0.25)
        ax.set_title(f"{split} ({protocol}, n={int(g['n'].iloc[0])}, 95% Wilson CI)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_mcub_item(items_media: dict[str, list[np.ndarray]], title: str = "") -> plt.Figure:
    """Draw the inputs of one benchmark item side by side (``{modality: [array, ...]}``)."""
    pairs = [(m, x) for m, xs in items_media.items() for x in xs]
    fig = plt.figure(figsize=(3 * len(pairs), 3))
    for i, (mod, x) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), i + 1, **({"projection": "3d"} if mod == "point" else {}))
        draw_input(ax, mod, x, mod)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_describe_conflict(conflict: dict[str, dict[str, dict[str, float]]]) -> plt.Figure:
    """Stacked bars: which modality's meaning of "describe it" each system's answers follow.

    conflict: :func:`mckit.experiments.composition.describe_conflict` (``{modality: {system: {own, other, invalid, n}}}``).
    """
    rows = [{"modality": m, "system": s, "own": r["own"], "other": r["other"], "invalid": r["invalid"]}
            for m, systems in conflict.items() for s, r in systems.items()]
    frame = pd.DataFrame(rows).set_index(["modality", "system"])
    colours = {"own": "tab:green", "other": "tab:red", "invalid": "tab:gray"}
    fig, ax = plt.subplots(figsize=(1.1 * len(frame) + 2, 3.2))
    bottom = np.zeros(len(frame))
    for part, colour in colours.items():
        ax.bar(range(len(frame)), frame[part], bottom=bottom, color=colour, label=part)
        bottom += frame[part].to_numpy()
    ax.set_xticks(range(len(frame)), [f"{m}\n{s}" for m, s in frame.index], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel('share of "describe it" answers')
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    return fig


def plot_capability_items(items_by_task: dict[str, list], columns: int = 4) -> plt.Figure:
    """Example images of each capability task, titled with the question and the gold answer.

    items_by_task: ``{task: [CapabilityItem, ...]}`` (see :func:`mckit.world.capabilities.capability_items`).
    """
    rows = len(items_by_task)
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.2 * rows), squeeze=False)
    for r, (task, items) in enumerate(items_by_task.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                it = items[c]
                ax.imshow(np.transpose(it.image, (1, 2, 0)), interpolation="nearest")
                question = it.prompt.split(" . ", 1)[1]
                ax.set_title(f"{task}: {question}\n-> {it.answer}", fontsize=7)
    fig.tight_layout()
    return fig


def plot_zoo(frame: pd.DataFrame) -> plt.Figure:
    """Heatmaps (one per regime): test accuracy of every system on every capability task and their mean.

    frame: :func:`mckit.experiments.merging_zoo.capability_frame` rows of one or more regimes.
    """
    regimes = list(dict.fromkeys(frame["regime"]))
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.2 * len(regimes), 0.36 * frame["system"].nunique() + 1.6),
                             squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        part = frame[frame["regime"] == regime]
        grid = part.pivot_table(index="system", columns="task", values="acc", sort=False)
        heatmap(grid, ax, vmin=0, vmax=1, cmap="viridis", cbar=ax is axes[0][-1])
        ax.set_title(f"{regime} fine-tuning: test accuracy", fontsize=10)
        ax.tick_params(axis="x", rotation=45)
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_lambda_curves(tables: dict[str, dict[str, dict]]) -> plt.Figure:
    """Validation score against lambda for every method (one panel per table, e.g. per regime); chosen lambda dotted."""
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.4), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables.items()):
        for name, row in table.items():
            if row.get("val"):
                lams = [float(k) for k in row["val"]]
                line, = ax.plot(lams, list(row["val"].values()), marker="o", ms=3, label=name)
                ax.axvline(row["lam"], color=line.get_color(), ls=":", lw=0.8)
        ax.set_xlabel("lambda")
        ax.set_ylabel("validation accuracy")
        ax.set_title(title, fontsize=10)
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_lambda_choice(table: dict[str, dict], method: str, lam: float, title: str = "") -> plt.Figure:
    """One merging method at one lambda, on validation items: its mean accuracy over the lambda grid (left; the
    value validation chose dotted) and its accuracy per task at ``lam`` (right), beside the base and the
    multi-task model.

    table: one regime of :func:`mckit.experiments.merging_zoo.capability_tables` (rows with ``val_by_lambda``).
    """
    by_lam = table[method]["val_by_lambda"]
    refs = {name: table[name]["val_by_task"] for name in ("base", "multitask") if "val_by_task" in table.get(name, {})}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.4), gridspec_kw={"width_ratios": [1, 1.5]})
    left.plot([float(k) for k in by_lam], [v["mean"] for v in by_lam.values()], marker="o", color="tab:blue")
    left.axvline(lam, color="tab:red", lw=2, label=f"lambda = {lam}")
    left.axvline(table[method]["lam"], color="k", ls=":", label=f"chosen on validation: {table[method]['lam']}")
    for (name, accs), style in zip(refs.items(), ("--", "-.")):
        left.axhline(accs["mean"], color="gray", ls=style, lw=1, label=name)
    left.set(xlabel="lambda", ylabel="validation accuracy (mean of 5 tasks)", ylim=(0, 1))
    left.legend(fontsize=7)
    at = by_lam[str(float(lam))]
    tasks = [t for t in at if t != "mean"]
    x = np.arange(len(tasks))
    right.bar(x, [at[t] for t in tasks], color="tab:red", alpha=0.8, label=f"{method}, lambda = {lam}")
    for (name, accs), marker in zip(refs.items(), ("_", "x")):
        right.scatter(x, [accs[t] for t in tasks], marker=marker, s=160, color="k", zorder=3, label=name)
    right.set(xticks=x, ylim=(0, 1), ylabel="validation accuracy")
    right.set_xticklabels(tasks)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: {method}" if title else method, fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy_bars(frame: pd.DataFrame, title: str, chance: float | None = None) -> plt.Figure:
    """Bars with 95% CIs, one per system (frame columns: system, acc, ci_low, ci_high)."""
    fig, ax = plt.subplots(figsize=(0.55 * len(frame) + 2, 3.2))
    colours = ["tab:gray" if s.startswith("single:") else "tab:green" if s == "naivemc" else "tab:blue"
               for s in frame["system"]]
    _ci_bars(ax, frame.reset_index(drop=True), colours, chance)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_seeds(frame: pd.DataFrame, title: str) -> plt.Figure:
    """Accuracy of each system for every training seed (points) and their mean (bar).

    frame: :func:`mckit.experiments.composition.seed_table` (columns seed, system, acc).
    """
    fig, ax = plt.subplots(figsize=(0.9 * frame["system"].nunique() + 2, 3.2))
    sns.barplot(frame, x="system", y="acc", ax=ax, color="lightsteelblue", errorbar=None)
    sns.stripplot(frame, x="system", y="acc", hue="seed", ax=ax, palette="dark:k", size=5, jitter=0.15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("")
    ax.set_title(title, fontsize=10)
    ax.legend(title="seed", fontsize=7, title_fontsize=8)
    fig.tight_layout()
    return fig


def plot_expert_geometry(geometry: dict[str, dict]) -> plt.Figure:
    """Left: ||tau|| / ||theta_0|| of each expert and the multi-task model, per regime; then, per regime,
    the cosines between the experts' task vectors (from :func:`mckit.experiments.recipe.expert_geometry`)."""
    regimes = list(geometry)
    fig, axes = plt.subplots(1, 1 + len(regimes), figsize=(4.6 * (1 + len(regimes)), 3.8))
    norms = pd.DataFrame([{"model": m, "regime": r, "rel_norm": v} for r, g in geometry.items()
                          for m, v in g["rel_norm"].items()])
    sns.barplot(norms, x="model", y="rel_norm", hue="regime", ax=axes[0])
    axes[0].set(xlabel="", ylabel="||tau|| / ||theta_0||", title="how far each model moved")
    axes[0].tick_params(axis="x", rotation=30)
    for ax, regime in zip(axes[1:], regimes):
        g = geometry[regime]
        heatmap(pd.DataFrame(g["cosine"]), ax, fontsize=8, vmin=-1, vmax=1, cmap="vlag", cbar=False)
        ax.set_title(f"{regime}: cosines; cos(sum, multitask) = {g['cos_sum_multitask']:.2f}", fontsize=9)
    fig.tight_layout()
    return fig
