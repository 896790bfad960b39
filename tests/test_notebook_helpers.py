"""Helpers the notebooks call: how many threads torch may use, and how they wait."""

import os
import subprocess
import sys

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

    from mckit.report.notebook import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (min(affinity, expected) if expected else affinity)


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


def test_importing_mckit_before_torch_makes_openmp_threads_sleep_unless_told_otherwise():
    code = "import mckit, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    told = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, check=True)
    assert (default.stdout.strip(), told.stdout.strip()) == ("PASSIVE", "ACTIVE")
