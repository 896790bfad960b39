"""Notebooks with widgets, as a student sees them: JupyterLab in headless Chromium, every cell run.

Fails on any error output, a widget that does not render, or an explorer whose figure does
not change when its control moves. Needs Debian's ``chromium`` (``.ci/run`` installs it) and
``playwright`` (its wheel carries the driver; no browser is downloaded). Screenshots go to
``tests/.screenshots`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "tests" / ".screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: JupyterLab settings for the run: every cell rendered (no windowing), no news pop-up.
SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"}}
#: Notebooks with an explorer, and how a student moves its control: one notebook (every explorer is built by
#: ``mckit.report.explore._explore``, whose select and slider controls are tested headless with each explorer's
#: redraw in test_notebook_helpers; here the widgets must render and redraw in a real JupyterLab).
WITH_WIDGETS = {"04_mmer": "slider"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a copy of the notebooks (it autosaves outputs: never into the repository's)."""
    assert CHROMIUM, "Debian's chromium is needed: `apt-get install -y chromium` (.ci/run installs it)"
    served = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", served / "notebooks")
    for plugin, settings in SETTINGS.items():
        (served / "settings" / plugin).parent.mkdir(parents=True, exist_ok=True)
        (served / "settings" / plugin).write_text(json.dumps(settings))
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTER_PLATFORM_DIRS": "1",       # fresh settings and workspaces
           "JUPYTERLAB_SETTINGS_DIR": str(served / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(served / "workspaces")}
    env.pop("MCKIT_HEADLESS", None)                       # widgets must be live here
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
                             "--LabApp.expose_app_in_browser=True", "--allow-root",
                             f"--ServerApp.root_dir={served}"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start; see {SHOTS / 'lab.log'}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_IDLE = """() => { const w = window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    const running = [...document.querySelectorAll('.jp-InputPrompt')].some(e => e.textContent.includes('*'));
    return k && k.status === 'idle' && !running; }"""
_ERRORS = """() => [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"],'
    + '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')].map(e => e.textContent.slice(0, 400))"""
_BROKEN_WIDGETS = """() => [...document.querySelectorAll('.jp-OutputArea-output')].filter(e =>
    e.textContent.includes('Error displaying widget') || e.textContent.includes('Loading widget')).length"""


def _run_all(page, url: str, notebook: str) -> None:
    page.goto(f"{url}/lab/workspaces/{notebook}/tree/notebooks/{notebook}.ipynb?reset", wait_until="domcontentloaded")
    page.wait_for_function("window.jupyterapp !== undefined", timeout=180_000)
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook", timeout=180_000)
    page.wait_for_function(_IDLE, timeout=180_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_timeout(1000)
    page.wait_for_function(_IDLE, timeout=300_000, polling=1000)
    page.wait_for_timeout(1500)


def _explorer_image(explorer) -> str | None:
    images = explorer.locator(".jp-RenderedImage img, .widget-output img")
    return images.last.get_attribute("src") if images.count() else None


def _move(page, explorer, control: str) -> None:
    if control == "slider":
        explorer.locator(".widget-slider .noUi-handle, .widget-slider .slider-handle").first.focus()
        for _ in range(2):
            page.keyboard.press("ArrowRight")
    else:
        select = explorer.locator("select").first
        select.scroll_into_view_if_needed()
        options = select.locator("option").all_inner_texts()
        current = select.input_value()
        select.select_option(next(o for o in options if o != current))


@pytest.mark.parametrize("notebook", sorted(WITH_WIDGETS))
def test_notebook_in_a_real_browser(lab, notebook):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--no-first-run",
                                                                    "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _run_all(page, lab, notebook)
            errors, broken = page.evaluate(_ERRORS), page.evaluate(_BROKEN_WIDGETS)
            explorer = page.locator(".jp-Cell", has=page.locator(".widget-interact")).last
            assert not errors, errors
            assert broken == 0 and explorer.count() == 1, "the explorer's widgets did not render"
            explorer.scroll_into_view_if_needed()
            before = _explorer_image(explorer)
            _move(page, explorer, WITH_WIDGETS[notebook])
            page.wait_for_function(_IDLE, timeout=120_000, polling=500)
            page.wait_for_timeout(2000)
            after = _explorer_image(explorer)
            page.screenshot(path=str(SHOTS / f"{notebook}.png"))
            assert before and after and before != after, "moving the control did not change the figure"
            assert not page.evaluate(_ERRORS)
        finally:
            browser.close()
