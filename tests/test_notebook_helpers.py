"""Helpers the notebooks call: how many threads torch may use, and how they wait."""

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "50000 100000"}, 1),                      # cgroup v2, half a CPU
    ({"cpu.max": "150000 100000"}, 2),                     # 1.5 CPUs -> 2 threads
    ({"cpu.max": "max 100000"}, None),                     # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),   # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({}, None),
])
def test_threads_follow_the_containers_cpu_quota(tmp_path, files, expected):
    import os

    from mckit.storage.cpus import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    no_stat = tmp_path / "no-proc-stat"                      # leave the machine's load out of this test
    assert usable_cpus(tmp_path, no_stat) == (min(affinity, expected) if expected else affinity)


def test_idle_cpus_from_two_readings_of_proc_stat(tmp_path):
    from mckit.storage.cpus import cpu_times, idle_cpus

    stat = tmp_path / "stat"
    stat.write_text("cpu  300 0 100 1500 100 0 0 0 0 0\n"
                    "cpu0 200 0 50 700 50 0 0 0 0 0\ncpu1 100 0 50 800 50 0 0 0 0 0\nintr 1 2 3\n")
    before = cpu_times(stat)
    assert before == {0: (250, 1000), 1: (150, 1000)}
    after = {0: (350, 1100), 1: (160, 1100)}                  # cpu0 fully busy, cpu1 90% idle
    assert idle_cpus(before, after, {0, 1}) == pytest.approx(0.9)
    assert idle_cpus(before, after, {0}) == 0 and idle_cpus(before, before, {0, 1}) is None
    assert cpu_times(tmp_path / "missing") == {}


def test_a_busy_core_leaves_torch_one_thread_fewer(tmp_path):
    from mckit.storage.cpus import usable_cpus

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) != 2:
        pytest.skip("needs exactly two CPUs")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpus[0]})
        time.sleep(0.5)
        assert usable_cpus(tmp_path, interval=0.5) == 1
    finally:
        busy.kill()
        busy.wait()


def test_explorers_draw_one_figure_headless_and_redraw_when_a_control_moves(monkeypatch):
    import matplotlib.pyplot as plt

    from mckit.eval.mcub import load_benchmark
    from mckit.models.shipped import load_model, load_world
    from mckit.report import explore

    world = load_world()
    monkeypatch.setenv("MCKIT_HEADLESS", "1")
    fig = explore.explore_answers(world, "image", world.names[3], "full")
    assert isinstance(fig, plt.Figure) and fig.axes
    items = load_benchmark("MCUB-4", "test")[:3]
    models = {"single:image": load_model("image", "full")}
    assert isinstance(explore.explore_items(models, items, 1), plt.Figure)
    monkeypatch.setenv("MCKIT_HEADLESS", "0")
    import IPython.display

    drawn = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, *a, **k: drawn.append(obj))
    shown = explore.explore_answers(world, "image", world.names[3], "full")
    controls = {type(c).__name__ for c in shown.widget.children}
    assert {"Dropdown", "ToggleButtons", "Text"} <= controls
    shown.widget.children[0].value = "audio"             # another modality: its model is loaded and asked
    figures = [d for d in drawn if isinstance(d, plt.Figure)]
    assert len(figures) == 2                             # the first draw, then one per move
    assert shown.widget.result is None                   # drawn by display only: never twice
    slider = explore.explore_items(models, items, 0).widget
    slider.children[0].value = 2
    assert slider.children[0].max == 2 and isinstance(drawn[-1], plt.Figure)
    plt.close("all")



def test_lambda_explorer_selects_precomputed_accuracies_and_redraws(monkeypatch):
    """The slider only selects: the right panel's bars are the stored accuracies at the chosen lambda."""
    import IPython.display
    import matplotlib.pyplot as plt

    from mckit.report import explore

    tasks = {"vqa": 0.2, "ocr": 0.4}
    row = {"lam": 0.5, "val": {"0.1": 0.3, "1.0": 0.6},
           "val_by_lambda": {"0.1": {**tasks, "mean": 0.3}, "1.0": {"vqa": 0.5, "ocr": 0.7, "mean": 0.6}}}
    tables = {"full": {"base": {"val_by_task": {**tasks, "mean": 0.3}}, "ties": row,
                       "average": {"lam": 1.0, "val": {}}}}
    monkeypatch.setenv("MCKIT_HEADLESS", "1")
    fig = explore.explore_lambda(tables, "full", "ties", 1.0)
    bars = [p.get_height() for p in fig.axes[1].patches]
    assert bars == [0.5, 0.7] and "ties" in fig._suptitle.get_text()
    monkeypatch.setenv("MCKIT_HEADLESS", "0")
    drawn = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, *a, **k: drawn.append(obj))
    shown = explore.explore_lambda(tables, "full", "ties", 1.0).widget
    method, slider = shown.children[1], shown.children[2]
    assert list(method.options) == ["ties"]                 # only methods with a lambda to slide
    slider.value = 0.1
    assert [p.get_height() for p in drawn[-1].axes[1].patches] == [0.2, 0.4]
    plt.close("all")


def test_damc_and_mmer_explorers_redraw_when_a_slider_moves(monkeypatch):
    import IPython.display
    import matplotlib.pyplot as plt

    from mckit.compose import mmer
    from mckit.eval.mcub import SPLITS, load_benchmark
    from mckit.experiments.composition import Systems
    from mckit.report import explore

    four = SPLITS["MCUB-4"]
    lora, full = Systems("lora"), Systems("full")
    val = load_benchmark("MCUB-4", "val")[:4]
    taus = mmer.model_task_vectors(full.sources(four, "full"), full.base)
    name = "model.layers.3.mlp.down_proj.weight"
    monkeypatch.setenv("MCKIT_HEADLESS", "1")
    assert isinstance(explore.explore_mmer_masks(taus, name, 0.8, 1.0), plt.Figure)
    monkeypatch.setenv("MCKIT_HEADLESS", "0")
    drawn = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, *a, **k: drawn.append(obj))
    masks = explore.explore_mmer_masks(taus, name, 0.8, 1.0).widget
    first = drawn[-1].axes[0].get_ylabel()                    # "image\nkeeps 57%": the density at K 0.8
    masks.children[0].value = 0.2
    assert len(drawn) == 2 and drawn[-1].axes[0].get_ylabel() != first
    lams = explore.explore_damc_lambdas(lora, four, val, [0.25] * 4).widget
    lams.children[0].value = 1.0
    assert len(drawn) == 4 and all(isinstance(d, plt.Figure) for d in drawn)
    plt.close("all")
