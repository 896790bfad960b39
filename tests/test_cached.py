"""Stored results of the slow experiments: used only for the same parameters and byte-identical inputs."""

import json

import pandas as pd
import pytest

from mckit.build.cache import build_cache
from mckit.experiments import cached
from mckit.storage.fingerprint import tree_fingerprint
from mckit.storage.paths import NOTEBOOKS_DIR


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A registered experiment over a tiny input folder, counting its calls."""
    world = tmp_path / "world"
    world.mkdir()
    (world / "weights.bin").write_bytes(b"\x00\x01")
    calls = []

    def table(n, world_dir=None, device="cpu"):
        calls.append(n)
        return {"acc": n / 10, "rows": (1, 2)}

    monkeypatch.setitem(cached.EXPERIMENTS, "fake", cached.Experiment(table, {"n": 5}, ("world_dir",), "none"))
    monkeypatch.setitem(cached.INPUT_DIRS, "world_dir", lambda: world)
    return {"world": world, "calls": calls, "store": tmp_path / "results"}


def test_fingerprint_follows_names_and_bytes_not_hidden_files(tmp_path):
    (tmp_path / "a").write_bytes(b"xy")
    first = tree_fingerprint(tmp_path)
    (tmp_path / ".mckit-output").write_text("")
    (tmp_path / ".a.tmp-1-x").mkdir()
    (tmp_path / ".a.tmp-1-x" / "junk").write_text("junk")
    assert tree_fingerprint(tmp_path) == first
    (tmp_path / "a").write_bytes(b"xz")
    assert tree_fingerprint(tmp_path) != first
    (tmp_path / "a").write_bytes(b"xy")
    (tmp_path / "a").rename(tmp_path / "b")
    assert tree_fingerprint(tmp_path) != first
    with pytest.raises(FileNotFoundError, match="missing"):
        tree_fingerprint(tmp_path / "missing")


def test_default_run_reads_a_stored_value_only_for_the_same_parameters_and_inputs(fake, capsys):
    store, calls = fake["store"], fake["calls"]
    assert cached.run("fake", "smoke", full={"n": 5}, smoke={"n": 2}, results_dir=store) == {"acc": 0.2,
                                                                                           "rows": (1, 2)}
    assert calls == [2] and "computed now at the smaller default size (n=2): nothing stored" in capsys.readouterr().out
    assert cached.used("fake") == {"n": 2}

    build_cache(store, ["fake"])
    assert calls == [2, 5]
    value = cached.run("fake", "smoke", full={"n": 5}, smoke={"n": 2}, results_dir=store, device="cuda")
    assert value == {"acc": 0.5, "rows": [1, 2]} and calls == [2, 5]           # stored; the device is neutral
    assert "stored full run (n=5" in capsys.readouterr().out and cached.used("fake") == {"n": 5, "device": "cuda"}

    cached.run("fake", "smoke", full={"n": 6}, smoke={"n": 2}, results_dir=store)
    assert calls[-1] == 2 and "stored with other parameters" in capsys.readouterr().out
    cached.run("fake", "full", full={"n": 5}, smoke={"n": 2}, results_dir=store)
    assert calls[-1] == 5                                                      # full mode always computes

    (fake["world"] / "weights.bin").write_bytes(b"\x00\x02")
    cached.run("fake", "smoke", full={"n": 5}, smoke={"n": 2}, results_dir=store)
    assert calls[-1] == 2 and "the inputs changed since it was stored (world_dir)" in capsys.readouterr().out


def test_build_cache_resumes_and_refuses_bad_input_before_any_work(fake, capsys):
    store, calls = fake["store"], fake["calls"]
    build_cache(store, ["fake"])
    build_cache(store, ["fake"])
    assert calls == [5] and "fake: up to date, skipped" in capsys.readouterr().out
    build_cache(store, ["fake"], overwrite=True)
    assert calls == [5, 5]
    assert sorted(p.name for p in store.iterdir()) == ["fake.json"]            # no temporary left behind
    with pytest.raises(ValueError, match="unknown experiment.*nope"):
        build_cache(store, ["nope"])
    (store / "fake.json").write_text("{not json")
    with pytest.raises(ValueError, match="fake.json: not valid JSON"):
        build_cache(store, ["fake"], overwrite=True)
    (store / "fake.json").write_text(json.dumps({"value": 1}))
    with pytest.raises(ValueError, match="fake.json: not a stored result"):
        build_cache(store, ["fake"], overwrite=True)
    assert calls == [5, 5] and (store / "fake.json").read_text() == json.dumps({"value": 1})
    with pytest.raises(ValueError, match="is a file"):
        build_cache(store / "fake.json", ["fake"])


def test_data_frames_come_back_as_data_frames(fake, monkeypatch):
    frame = pd.DataFrame([{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.25}])
    monkeypatch.setitem(cached.EXPERIMENTS, "fake", cached.Experiment(lambda n, world_dir=None: frame, {"n": 1},
                                                                      ("world_dir",), "none"))
    build_cache(fake["store"], ["fake"])
    back = cached.run("fake", "smoke", full={"n": 1}, smoke={"n": 1}, results_dir=fake["store"])
    pd.testing.assert_frame_equal(back, frame)


def test_side_by_side_accepts_a_few_flipped_items_and_no_other_lambda():
    stored = {"lambda": 0.5, "test": {"acc": 0.50, "n": 400}}
    assert cached.agrees(cached.side_by_side(stored, {"lambda": 0.5, "test": {"acc": 0.51, "n": 400}}))
    frame = cached.side_by_side(stored, {"lambda": 0.5, "test": {"acc": 0.5125, "n": 400}})
    assert frame.loc["test", "items_apart"] == 5 and not cached.agrees(frame)
    assert not cached.agrees(cached.side_by_side(stored, {"lambda": 0.7, "test": {"acc": 0.5, "n": 400}}))
    assert cached.agrees(cached.side_by_side({"t": {"acc": 0.5, "n": 20}}, {"t": {"acc": 0.55, "n": 20}}))


def _parameters(notebook: str) -> dict:
    cells = json.loads((NOTEBOOKS_DIR / f"{notebook}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
    params: dict = {}
    exec(source, {}, params)
    return params


#: How each stored experiment's full-mode parameters read in its notebook's parameters cell.
NOTEBOOK_FULL = {
    "capability_tables": lambda p: {"regimes": p["REGIMES"], "n_val": p["N_VAL_FULL"], "n_test": p["N_TEST_FULL"]},
    "rank_ablation": lambda p: {"regime": "full", "n_val": p["N_VAL_FULL"], "n_test": p["N_TEST_FULL"]},
    "modality_table": lambda p: {"variant": p["MODALITY_VARIANT"], "n_val": p["N_MODALITY_VAL_FULL"],
                                 "n_test": p["N_MODALITY_FULL"]},
    "mcub_results": lambda p: {"variant": p["VARIANT"], "n": p["N_FULL"], "splits": list(cached.SPLITS)},
    "mcub_seeds": lambda p: {"variant": p["VARIANT"], "n": p["N_FULL"]},
    "damc_results": lambda p: {"n": p["N_FULL"], "n_tune": p["N_TUNE_FULL"], "splits": p["SPLITS"]},
    "damc_single": lambda p: {"n": None},        # notebook 03 computes every single-modality item in full mode
    "damc_seeds": lambda p: {"n": None},
    "damc_by_count": lambda p: {"n": p["N_COUNT_FULL"]},
    "mmer_results": lambda p: {"n": p["N_FULL"], "n_tune": p["N_TUNE_FULL"], "splits": p["SPLITS"]},
    "mmer_single": lambda p: {"n": None},
    "mmer_sensitivity": lambda p: {"n": 200},
    "mmer_forgetting": lambda p: {"modality": p["FORGET_MODALITY"], "steps": p["FORGET_STEPS_FULL"], "n": None},
}


@pytest.mark.parametrize("name", list(cached.EXPERIMENTS))
def test_shipped_store_matches_the_shipped_data_and_the_notebook_defaults(name):
    """Rebuilding data/world, data/experts or data/mcub without `python -m mckit build-cache` fails here."""
    exp = cached.EXPERIMENTS[name]
    assert NOTEBOOK_FULL[name](_parameters(exp.notebook)) == exp.full
    record, why = cached.lookup(name, exp.full)
    assert record is not None, f"data/results/{name}.json: {why}; run `python -m mckit build-cache`"
