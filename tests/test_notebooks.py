"""Every notebook runs headless: under nbval (defaults, as a student runs it) and under papermill
(parameters injected, as a researcher's job runs it). Numbers are asserted inside the cells."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mckit.report.links import colab_setup_source

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: Non-default parameters per notebook for the papermill run.
INJECTED = {
    "00_world": {"ENTITIES": [4, 9], "SEED": 3},
    "01_mllms": {"MODALITY": "audio", "VARIANT": "lora", "ENTITY": 7, "N_EVAL_SMOKE": 40},
    "02_naivemc": {"VARIANT": "full", "MODALITIES": ["image", "audio", "video"], "ITEM": 3, "N_SMOKE": 60},
    "03_damc": {"SPLITS": ["MCUB-4"], "N_SMOKE": 16, "N_TUNE_SMOKE": 8, "N_LIVE": 8, "ITEM": 2,
                "EXPLORE_LAMBDAS": [0.5, 0.25, 0.25, 0.1]},
    "04_mmer": {"N_SMOKE": 16, "N_TUNE_SMOKE": 8, "N_SINGLE_SMOKE": 8, "N_SENSITIVITY_SMOKE": 4, "MASK_KEEP": 0.6,
                "MASK_LAMBDA": 0.8, "FORGET_MODALITY": "audio", "FORGET_STEPS_SMOKE": 10},
    "05_merging_zoo": {"EXPLORE_METHOD": "ties", "EXPLORE_LAMBDA": 0.5, "RANK_ABLATION": False,
                       "N_MODALITY_SMOKE": 20, "N_MODALITY_VAL_SMOKE": 10},
    "07_real_mllms": {"METHOD": "damc", "LAMBDA": 0.5, "N": 3, "DTYPE": "float32", "DEVICE": "cpu"},
    "06_mcub": {"DEVICE": "cpu", "N_SMOKE": 12},
}
#: Seconds a notebook's default run may take under nbval. Measured on 2 cores with another process busy on one
#: of them: 6-29 s per notebook (06 the longest), so this leaves more than 10x.
NBVAL_TIMEOUT = 300


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "MCKIT_HEADLESS": "1"}


def test_notebooks_are_stripped_and_parameterised():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{path.name}: outputs"
        tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: want one parameters cell"
        assert 'MODE = "auto"' in "".join(tagged[0]["source"])
        for line in "".join(tagged[0]["source"]).splitlines():  # papermill cannot parse a second '=' on a line
            assert line.count("=") <= 1, f"{path.name}: parameters line {line!r} has more than one '='"
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        assert "".join(code[0]["source"]) == colab_setup_source(), f"{path.name}: first cell is not the Colab set-up"
        assert path.stem in INJECTED, f"{path.name}: add papermill parameters to INJECTED"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_nbval(path):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          str(path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=NBVAL_TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_papermill_with_parameters(path, tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("MCKIT_HEADLESS", "1")

    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters=INJECTED[path.stem], cwd=str(path.parent),
                               kernel_name="python3", progress_bar=False)
    nb = json.loads(out.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and all(k in "".join(injected[0]["source"]) for k in INJECTED[path.stem])
