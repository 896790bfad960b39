"""DAMC's figures: the route of every position of a prompt, the lambda sweep, the live lambda explorer, accuracy
against the number of composed modalities."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from mckit.eval.protocols import OPTION_SCORE, evaluate_items, wilson

ROUTE_COLOURS = {"text": "tab:gray", "image": "tab:blue", "audio": "tab:orange", "video": "tab:green",
                 "point": "tab:purple"}


def plot_routes(frame: pd.DataFrame, per_row: int = 24) -> plt.Figure:
    """Each position of one prompt as a box coloured by its route, its token written in it.

    frame: :func:`mckit.experiments.damc.route_map` (columns position, token, route).
    """
    rows = -(-len(frame) // per_row)
    fig, ax = plt.subplots(figsize=(per_row * 0.62, 0.62 * rows + 0.8))
    for i, r in frame.iterrows():
        y, x = divmod(i, per_row)
        ax.add_patch(plt.Rectangle((x, -y), 0.95, 0.9, color=ROUTE_COLOURS.get(r["route"], "k"), alpha=0.35))
        ax.text(x + 0.47, -y + 0.45, r["token"], ha="center", va="center", fontsize=6, rotation=40)
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows + 1, 1)
    ax.axis("off")
    used = list(dict.fromkeys(frame["route"]))
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=ROUTE_COLOURS.get(r, "k"), alpha=0.35) for r in used],
              labels=[f"route: {r}" for r in used], ncol=len(used), fontsize=8, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_lambda_sweep(tuned: dict, n: int) -> plt.Figure:
    """Validation accuracy (95% Wilson CI) as each modality's lambda moves, the others held where the search had
    them (:func:`mckit.experiments.damc.tune_lambdas`'s trace); dotted: the default 1/N."""
    trace = pd.DataFrame(tuned["trace"])
    start = trace.iloc[0]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for mod, part in trace.iloc[1:].groupby("modality", sort=False):
        lo, hi = zip(*(wilson(round(s * n), n) for s in part["score"]))
        ax.errorbar(part["lam"], part["score"], yerr=[part["score"] - lo, pd.Series(hi) - part["score"].values],
                    marker="o", capsize=2, label=mod, color=ROUTE_COLOURS.get(mod))
    ax.axvline(start["lam"], color="k", ls=":", lw=1, label=f"1/N = {start['lam']:.2f}")
    ax.set_xlabel("lambda of that modality's text LoRA")
    ax.set_ylabel(f"validation accuracy (n={n})")
    ax.set_title(f"chosen: {', '.join(f'{v:g}' for v in tuned['lam'])}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_live_lambdas(systems, modalities: tuple[str, ...], val: list, lams: list[float],
                      references: dict[str, float]) -> plt.Figure:
    """DAMC with the text-LoRA coefficients ``lams`` composed and scored now on ``val`` (option score), beside
    ``references`` (name -> accuracy on the same items)."""
    acc = evaluate_items(systems.build("damc_tuned", modalities, list(lams)), val, OPTION_SCORE)
    frame = pd.DataFrame([{"system": "your lambdas", "acc": acc["acc"], "ci": acc["ci95"]},
                          *({"system": k, "acc": v, "ci": wilson(round(v * len(val)), len(val))}
                            for k, v in references.items())])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [1, 2]})
    left.bar(modalities, lams, color=[ROUTE_COLOURS.get(m) for m in modalities])
    left.set_ylim(0, 1)
    left.set_title("lambda per text LoRA", fontsize=10)
    err = [[a - c[0] for a, c in zip(frame["acc"], frame["ci"])], [c[1] - a for a, c in zip(frame["acc"], frame["ci"])]]
    right.bar(frame["system"], frame["acc"], yerr=err, capsize=3, color=["tab:red"] + ["tab:gray"] * len(references))
    right.set_ylim(0, 1)
    right.set_title(f"validation accuracy (option score, n={len(val)}, 95% CI)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_by_count(by_count: dict, protocol: str = OPTION_SCORE) -> plt.Figure:
    """Accuracy (95% Wilson CI) of each system against the number of composed modalities, the items of every
    split of that size pooled (:func:`mckit.experiments.damc.damc_by_count`'s ``by_count``)."""
    table = by_count[protocol]
    counts = sorted(table, key=int)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for shift, name in zip((-0.04, 0.04, 0.0), next(iter(table.values()))):
        acc = [table[k][name]["acc"] for k in counts]
        err = [[a - table[k][name]["ci95"][0] for a, k in zip(acc, counts)],
               [table[k][name]["ci95"][1] - a for a, k in zip(acc, counts)]]
        ax.errorbar([int(k) + shift for k in counts], acc, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xticks([int(k) for k in counts])
    ax.set_xlabel("modalities composed (every split of that size pooled)")
    ax.set_ylabel(f"accuracy ({protocol})")
    ax.set_title(", ".join(f"k={k}: n={next(iter(table[k].values()))['n']}" for k in counts), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
