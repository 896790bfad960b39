"""Explorers: a pure plotting function and an ``explore_*`` wrapper that puts widgets on it.

In a live notebook the wrapper shows ipywidgets controls and redraws the figure
when one moves. Headless (papermill, nbval, ``make reproduce``: the environment
variable ``MCKIT_HEADLESS=1``), it draws one static figure for the given values.
"""

from __future__ import annotations

import functools
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt

from mckit.eval.mcub import MCUBItem
from mckit.experiments.composition import LAMBDAS
from mckit.experiments.per_item import answer_item, item_media
from mckit.models.mllm import MLLM
from mckit.models.shipped import load_model
from mckit.report.notebook import ask
from mckit.report.plots import draw_input, plot_exchange, plot_lambda_choice
from mckit.world.entities import LEVELS, MODALITIES, World

HEADLESS_ENV = "MCKIT_HEADLESS"


def headless() -> bool:
    """Whether no one can move a widget: papermill, nbval and ``make reproduce`` set ``MCKIT_HEADLESS=1``."""
    return os.environ.get(HEADLESS_ENV) == "1"


def _explore(plot: Callable, defaults: dict, controls: dict):
    """``plot(**defaults)`` once when headless; otherwise an ipywidgets ``interact`` over ``controls``."""
    if headless():
        return plot(**defaults)
    import ipywidgets as widgets
    from IPython.display import display

    def shown(**values) -> None:                 # display once and close, so no figure is drawn twice
        fig = plot(**values)
        display(fig)
        plt.close(fig)

    made = {name: make(defaults[name]) for name, make in controls.items()}
    return widgets.interact(shown, **made, **{k: widgets.fixed(v) for k, v in defaults.items() if k not in made})


def plot_answer(model: MLLM, world: World, modality: str, entity: str, level: str, question: str) -> plt.Figure:
    """One entity rendered in ``modality`` at ``level``, and ``model``'s answer to ``question`` about it."""
    return plot_exchange(ask(model, world, modality, entity, question, level), modality)


def explore_answers(world: World, modality: str, entity: str, variant: str = "full",
                    world_dir: str | Path | None = None, question: str = "what is this ?"):
    """Pick an entity, a modality and a level; see the input and the answer of that modality's ``variant`` model.

    Models of the shipped world are loaded on first use and kept.
    """
    import ipywidgets as widgets

    @functools.cache
    def model_for(mod: str) -> MLLM:
        return load_model(mod, variant, world_dir)

    def plot(modality: str, entity: str, level: str, question: str) -> plt.Figure:
        return plot_answer(model_for(modality), world, modality, entity, level, question)

    controls = {"modality": lambda v: widgets.Dropdown(options=list(MODALITIES), value=v, description="modality"),
                "entity": lambda v: widgets.Dropdown(options=world.names, value=v, description="entity"),
                "level": lambda v: widgets.ToggleButtons(options=list(LEVELS), value=v, description="level"),
                "question": lambda v: widgets.Text(value=v, description="question")}
    return _explore(plot, {"modality": modality, "entity": entity, "level": "high", "question": question}, controls)


def plot_item_answers(models: dict[str, MLLM], item: MCUBItem) -> plt.Figure:
    """An MCUB item's inputs, its question, and every system's answers (generated, and each protocol's letter)."""
    media = item_media(item)
    pairs = [(m, x) for m, xs in media.items() for x in xs]
    fig = plt.figure(figsize=(max(8, 2.6 * len(pairs)), 4.2))
    for i, (mod, x) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), i + 1, **({"projection": "3d"} if mod == "point" else {}))
        draw_input(ax, mod, x, mod)
    fig.subplots_adjust(top=0.92, bottom=0.42)
    rows = [f"{name:<16} generated {a['generated']!r:<30} letter {a['letter']:<2} named {a['named_letter'] or '-':<2} "
            f"option score {a['option_score']}"
            for name, a in ((n, answer_item(m, item)) for n, m in models.items())]
    question = item.prompt.split("?")[0].split(" . ")[-1] + "?"
    options = " ".join(f"({letter}) {text}" for letter, text in zip("ABCDEFGH", item.options))
    lines = [textwrap.shorten(question, 110), *textwrap.wrap(options, 110), f"gold: {item.answer}", "", *rows]
    fig.text(0.02, 0.37, "\n".join(lines), family="monospace", fontsize=8, va="top")
    return fig


def explore_items(models: dict[str, MLLM], items: list[MCUBItem], index: int = 0):
    """Pick an MCUB item with a slider; see its inputs and each system's answers."""
    import ipywidgets as widgets

    def plot(index: int) -> plt.Figure:
        return plot_item_answers(models, items[index])

    controls = {"index": lambda v: widgets.IntSlider(value=v, min=0, max=len(items) - 1, description="item")}
    return _explore(plot, {"index": index}, controls)


def explore_lambda(tables: dict[str, dict[str, dict]], regime: str, method: str = "task_arithmetic",
                   lam: float = 1.0):
    """Pick a regime and a merging method, slide lambda over the grid; see validation accuracy there.

    Nothing is recomputed: every lambda's accuracy per task was kept when the tables were built
    (:func:`mckit.experiments.merging_zoo.capability_tables`); the slider only selects.
    """
    import ipywidgets as widgets

    methods = [name for name, row in tables[regime].items() if row.get("val_by_lambda")]

    def plot(regime: str, method: str, lam: float) -> plt.Figure:
        return plot_lambda_choice(tables[regime], method, lam, f"{regime} fine-tuning")

    controls = {"regime": lambda v: widgets.Dropdown(options=list(tables), value=v, description="regime"),
                "method": lambda v: widgets.Dropdown(options=methods, value=v, description="method"),
                "lam": lambda v: widgets.SelectionSlider(options=list(LAMBDAS), value=v, description="lambda")}
    return _explore(plot, {"regime": regime, "method": method, "lam": lam}, controls)


def explore_damc_lambdas(systems, modalities: tuple[str, ...], val: list, lams: list[float]):
    """One slider per modality for the coefficient of its text LoRA in DAMC; each move composes DAMC again and
    scores ``val`` (option score), beside DAMC at 1/N and NaiveMC on the same items (scored once)."""
    import ipywidgets as widgets

    from mckit.eval.protocols import OPTION_SCORE, evaluate_items
    from mckit.report.plots_damc import plot_live_lambdas

    references = {name: evaluate_items(systems.build(name, modalities), val, OPTION_SCORE)["acc"]
                  for name in ("damc", "naivemc")}

    def plot(**values: float) -> plt.Figure:
        return plot_live_lambdas(systems, modalities, val, [values[m] for m in modalities], references)

    controls = {m: (lambda v, m=m: widgets.FloatSlider(value=v, min=0.0, max=1.0, step=0.05, description=m,
                                                       continuous_update=False)) for m in modalities}
    return _explore(plot, dict(zip(modalities, lams)), controls)


def explore_mmer_masks(taus: dict, name: str, keep: float, lam: float):
    """Sliders for TIES's K and the mask threshold lambda: MMER's masks rebuilt at each move (no scoring), drawn on
    one weight with every modality's density over the whole model."""
    import ipywidgets as widgets

    from mckit.report.plots_mmer import plot_mask_explorer

    def plot(keep: float, lam: float) -> plt.Figure:
        return plot_mask_explorer(taus, name, keep, lam)

    controls = {"keep": lambda v: widgets.FloatSlider(value=v, min=0.1, max=1.0, step=0.1, description="K",
                                                      continuous_update=False),
                "lam": lambda v: widgets.FloatSlider(value=v, min=0.1, max=2.0, step=0.1, description="lambda",
                                                     continuous_update=False)}
    return _explore(plot, {"keep": keep, "lam": lam}, controls)
