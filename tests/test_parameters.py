"""The notebooks' parameters are checked in the cell after the parameters cell, with one line a student can act on."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from mckit.report.parameters import ParameterError, check_parameters

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _parameters(path: Path) -> tuple[dict, str]:
    """(the parameters cell's values, the source of the cell after it)."""
    cells = json.loads(path.read_text())["cells"]
    i = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    values = {}
    for node in ast.parse("".join(cells[i]["source"])).body:
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values, "".join(cells[i + 1]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_checks_every_parameter_and_its_defaults_pass(path):
    values, check_cell = _parameters(path)
    call = next(n for n in ast.walk(ast.parse(check_cell)) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "check_parameters")
    assert sorted(k.arg for k in call.keywords) == sorted(values), path.name
    assert check_parameters(**values) == "parameters ok"


@pytest.mark.parametrize("name, value, fragment", [
    ("ENTITY", 999, "the world has 32 entities, numbered 0 to 31"),
    ("ENTITIES", [0, 40], "the world has 32 entities"),
    ("ITEM", 100000, "MCUB-4 has 400 test items, numbered 0 to 399"),
    ("ITEM", -1, "expected a whole number >= 0"),
    ("MODE", "fast", "expected one of 'auto', 'smoke', 'full'"),
    ("MODALITY", "smell", "expected one of 'image', 'audio', 'video', 'point'"),
    ("MODALITIES", ["image", "smell"], "'smell' is not one of"),
    ("MODALITIES", ["image", "image"], "each value may appear once"),
    ("REGIMES", [], "expected a non-empty list"),
    ("VARIANT", "merged", "expected one of 'stage1', 'frozen', 'lora', 'full'"),
    ("N_SMOKE", 0, "expected a whole number >= 1"),
    ("N_TEST_SMOKE", 2.5, "expected a whole number >= 1"),
    ("N_FULL", -4, "expected a whole number >= 1 or None"),
    ("SPLITS", ["MCUB-5"], "'MCUB-5' is not one of"),
    ("SEED", -1, "expected a whole number >= 0"),
    ("RANK_ABLATION", "yes", "expected True or False"),
    ("WORLD_DIR", "/nowhere/world", "no such directory"),
    ("OUT", 3, "expected a path as text, or None"),
    ("DEVICE", "tpu", "expected one of 'auto', 'cpu', 'cuda'"),
    ("N_SMOKE", 401, "MCUB-4 has 400 test items; write at most 400"),
    ("N_FULL", 1000, "has 400 test items; write at most 400 (or None for all)"),
    ("N_MODALITY_VAL_FULL", 101, "MCUB-3-image-audio-video has 100 val items; write at most 100"),
    ("N_MODALITY_SMOKE", 500, "MCUB-3-image-audio-video has 400 test items"),
    ("EXPLORE_METHOD", "average", "expected one of 'task_arithmetic', 'ties'"),
    ("EXPLORE_LAMBDA", 0.2, "lambda must be a value of the grid 0.1, 0.3, 0.5, 0.7, 1.0, 1.5"),
    ("EXPLORE_LAMBDA", True, "lambda must be a value of the grid"),
    ("MASK_KEEP", 0, "a number in (0, 1]"),
    ("MASK_LAMBDA", 2.5, "a number in (0, 2]"),
    ("SOURCES", ["llava-hf/llava-1.5-7b-hf:image"], "SOURCES need their BASE"),
    ("SOURCES", "llava", "expected a non-empty list of hub ids or folders"),
    ("METHOD", "magic", "expected one of 'average'"),
    ("LAMBDA", 0, "expected a number in (0, 2]"),
    ("MCUB_DIR", "/nowhere/mcub", "no such directory"),
    ("SPLIT", "MCUB-3-audio-video-point", "expected one of 'MCUB-4'"),
    ("DTYPE", "int8", "expected one of 'auto', 'float32'"),
    ("IMAGE_SIZE", 10, "expected a whole number >= 28 or None"),
])
def test_bad_parameter_is_one_line_naming_it(name, value, fragment):
    with pytest.raises(ParameterError) as err:
        check_parameters(**{name: value})
    text = str(err.value)
    assert text.startswith(f"{name} = {value!r}: ") and fragment in text and "\n" not in text, text
    assert text.endswith("change it in the parameters cell")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(ParameterError, match="this machine has no GPU"):
        check_parameters(DEVICE="cuda")


def test_an_unknown_parameter_is_named():
    with pytest.raises(ParameterError, match="COLOUR: no check is known"):
        check_parameters(COLOUR="red")


def test_a_notebook_outside_the_repository_is_told_so(monkeypatch, tmp_path):
    from mckit.report import parameters

    monkeypatch.setattr(parameters, "DATA_DIR", tmp_path / "data")
    message = r"WORLD_DIR = None: the kit's shipped .*world is missing: open the notebook"
    with pytest.raises(ParameterError, match=message):
        check_parameters(MODE="auto", WORLD_DIR=None, ENTITY=3)


def test_counts_are_checked_against_the_notebooks_own_splits():
    assert check_parameters(SPLITS=["MCUB-4"], N_FULL=400, N_SMOKE=1) == "parameters ok"
    with pytest.raises(ParameterError, match="SPLITS = "):         # a bad split is named before the counts
        check_parameters(N_SMOKE=5, SPLITS=["MCUB-5"])
