"""MMER's figures: its steps on one weight, the masks' densities, the sensitivity sweep, forgetting."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mckit.experiments.mmer import mask_steps

#: Mask densities the MMER paper reports (7B models, %).
PAPER_DENSITY = {"audio": 2.2, "point": 43.8, "video": 15.7, "image": 34.1}


def plot_mask_steps(steps: dict) -> plt.Figure:
    """One row per modality: tau_i, tau*, the sign test, the magnitude test, the mask m_i and m_i * tau* on a
    corner of one weight (:func:`mckit.experiments.mmer.mask_steps`); the row label gives the mask's density
    over the whole model."""
    mods = list(steps["steps"])
    lam, star = steps["lam"], steps["tau_star"]
    scale = max(float(np.abs(star).max()), *(float(np.abs(s["tau"]).max()) for s in steps["steps"].values()))
    titles = ["tau_i", "tau* (TIES, K = {:.0%})".format(steps["keep"]), "sign(tau_i) = sign(tau*)",
              f"|tau_i| >= {lam:g} * 50% * |tau*|", "mask m_i", "m_i * tau*"]
    fig, axes = plt.subplots(len(mods), len(titles), figsize=(2.0 * len(titles), 2.0 * len(mods) + 0.6),
                             squeeze=False)
    for row, mod in zip(axes, mods):
        s = steps["steps"][mod]
        panels = [(s["tau"], "RdBu_r", -scale, scale), (star, "RdBu_r", -scale, scale),
                  (s["sign"], "Greys", 0, 1), (s["magnitude"], "Greys", 0, 1), (s["mask"], "Greys", 0, 1),
                  (s["mask"] * star, "RdBu_r", -scale, scale)]
        for ax, (data, cmap, lo, hi) in zip(row, panels):
            ax.imshow(np.asarray(data, dtype=float), cmap=cmap, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{mod}\nkeeps {steps['density'][mod]:.0%}", fontsize=9)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{steps['name']} (top-left corner); black = kept", fontsize=9)
    fig.tight_layout()
    return fig


def plot_mask_explorer(taus: dict, name: str, keep: float, lam: float) -> plt.Figure:
    """:func:`plot_mask_steps` of the masks built now at ``keep`` (K) and ``lam`` (the explorer's figure)."""
    return plot_mask_steps(mask_steps(taus, name, keep, lam))


def plot_densities(frame: pd.DataFrame) -> plt.Figure:
    """Heatmap of each modality's mask density per layer and linear (:func:`mckit.experiments.mmer.density_frame`);
    the paper's whole-model densities in the row labels."""
    import seaborn as sns

    table = frame.pivot_table(index="modality", columns=["layer", "module"], values="density", sort=False)
    fig, ax = plt.subplots(figsize=(min(18, 0.45 * table.shape[1] + 2), 0.6 * len(table) + 1.6))
    sns.heatmap(table, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "share kept"})
    ax.set_yticklabels([f"{m} (paper {PAPER_DENSITY.get(m, float('nan')):.1f}%)" for m in table.index], rotation=0)
    ax.set_xlabel("layer - linear")
    ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_sensitivity(frame: pd.DataFrame) -> plt.Figure:
    """The paper's sweep as two heatmaps over K (rows) and lambda * 50% (columns): MMER's expansion on MCUB-4 and
    its retention (:func:`mckit.experiments.mmer.mmer_sensitivity`)."""
    from mckit.report.plots import heatmap

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, metric in zip(axes, ("expansion", "retention")):
        table = frame.pivot_table(index="keep", columns="threshold_pct", values=metric)
        heatmap(table, ax, fmt=".3f", fontsize=10, cmap="mako", cbar=False)
        ax.set_title(f"{metric} ({'MCUB-4, option score' if metric == 'expansion' else 'Eq. 8, own tasks'})")
        ax.set_xlabel("lambda * 50% (%)")
        ax.set_ylabel("K (share kept by TIES)")
    fig.tight_layout()
    return fig


def plot_forgetting(frame: pd.DataFrame) -> plt.Figure:
    """Bars per system of :func:`mckit.experiments.mmer.forgetting_frame`: old tasks kept (every modality; the
    fine-tuned modality's) and the new task against the fine-tuned model."""
    cols = {"old_kept_all": "old tasks kept (4 modalities)", "old_kept_modality": "old tasks kept (its modality)",
            "new_vs_fine_tuned": "new task / fine-tuned"}
    table = frame.set_index("system")[list(cols)].astype(float).rename(columns=cols)
    ax = table.plot.bar(figsize=(8, 3.6), rot=0, ylim=(0, 1.1))
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel("share")
    ax.figure.tight_layout()
    return ax.figure
