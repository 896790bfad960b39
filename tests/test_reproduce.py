"""The reproduce job's plumbing: notebooks' parts land in results.json and REPORT.md."""

import json

import pytest

from mckit.report import reproduce, sections


def test_write_part_is_collected_into_results(tmp_path):
    parts = tmp_path / "parts"
    path = reproduce.write_part(parts, "mcub", {"retention": {"naivemc": 0.5}})
    assert path == parts / "mcub.json" and json.loads(path.read_text()) == {"retention": {"naivemc": 0.5}}
    assert [p.name for p in parts.iterdir()] == ["mcub.json"]  # no temporary file left behind
    results = reproduce.collect("smoke", {"06_mcub": {"smoke": {"seconds": 1.0, "peak_mib": 300}}}, parts)
    assert results["retention"] == {"naivemc": 0.5} and results["mode"] == "smoke"
    assert reproduce.write_part(None, "mcub", {}) is None


def test_notebooks_get_an_absolute_out_on_their_last_run(tmp_path, monkeypatch):
    """Notebooks run with notebooks/ as working directory: a relative OUT would write beside them. A full
    reproduce runs each notebook's default (CPU) run first, only measured, then the full run that writes."""
    seen = []

    def fake_run(src, dst, parameters):
        seen.append((src.name, dst, parameters))
        return {"seconds": 1.0, "peak_mib": 100}

    monkeypatch.setattr(reproduce, "run_notebook", fake_run)
    runs = reproduce.run_notebooks(tmp_path, "full", "relative/parts")
    mcub = [(dst, p) for name, dst, p in seen if name == "06_mcub.ipynb"]
    assert [p["MODE"] for _, p in mcub] == ["smoke", "full"]
    assert "OUT" not in mcub[0][1]
    assert mcub[1][1]["OUT"].startswith("/") and mcub[1][1]["OUT"].endswith("relative/parts")
    assert mcub[1][0] == tmp_path / "06_mcub.ipynb" and mcub[0][0].parent != tmp_path  # only the last run is kept
    assert set(runs["06_mcub"]) == {"smoke", "full"}
    table = "\n".join(reproduce.notebook_section(runs))
    assert "| [06_mcub](notebooks/06_mcub.ipynb) | 1 | 100 | 1 | 100 |" in table


def test_run_notebook_measures_time_and_memory_and_reports_failure(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("N = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("assert N < 9, 'too big'\nimport numpy as np\n"
                                                                   "x = np.ones(N * 2**24)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "nb.ipynb"
    src.write_text(nbformat.writes(nb))
    small = reproduce.run_notebook(src, tmp_path / "small.ipynb", {"N": 1})
    big = reproduce.run_notebook(src, tmp_path / "big.ipynb", {"N": 4})
    assert small["seconds"] > 0 and big["peak_mib"] - small["peak_mib"] > 250  # 4 x 128 MiB against 128 MiB, sampled
    with pytest.raises(RuntimeError, match="(?s)nb.ipynb failed.*too big"):
        reproduce.run_notebook(src, tmp_path / "bad.ipynb", {"N": 9})


def test_seed_section_reports_spread_and_gaps():
    rows = [{"seed": s, "system": name, "acc": acc, "ci_low": 0, "ci_high": 1, "n": 10}
            for s, accs in {0: (0.4, 0.7), 1: (0.5, 0.6)}.items()
            for name, acc in zip(("single:image", "naivemc"), accs)]
    rows[1]["gap_points"], rows[3]["gap_points"] = 30.0, 10.0
    text = "\n".join(sections.seed_section(rows))
    assert "| single:image | 0.400 | 0.500 | 0.100 |" in text
    assert "seed 0: +30.0, seed 1: +10.0" in text


def test_binder_requirements_are_generated_from_the_kits():
    from mckit.report.binder import SOURCE, TARGET, binder_requirements

    assert TARGET.read_text() == binder_requirements(SOURCE.read_text()), \
        "binder/requirements.txt is out of date: run `python -m mckit.report.binder`"
    pins = {line.split("==")[0] for line in SOURCE.read_text().splitlines() if "==" in line} - {"playwright"}
    assert pins == {line.split("==")[0] for line in TARGET.read_text().splitlines() if "==" in line}
    assert "torch==2.13.0+cpu" in binder_requirements("torch==2.13.0\nnumpy==2.4.6\n")


def test_damc_section_has_every_protocol_the_lambdas_retention_conflict_and_seeds():
    def r(acc):
        return {"acc": acc, "ci95": [acc - 0.1, acc + 0.1], "n": 40}

    shares = {"own": 0.5, "other": 0.3, "invalid": 0.2, "n": 10}
    part = {"mcub": {"MCUB-4": {"results": {p: {"naivemc": r(0.6), "damc": r(0.7)} for p in ("letter", "option_score")},
                                "lambdas": {"tuned": {"lam": [0.5, 0.25, 0.25, 0.1], "val": 0.72, "trace": []},
                                            "fallback": [0.3, 0.2, 0.25, 0.25]}}},
            "single": {"retention": {"naivemc": 0.78, "damc": 0.93, "decoupled_vs_lora": 0.97},
                       "conflict": {"image": {"original": shares, "naivemc": shares, "damc": shares}}},
            "seeds": [{"seed": s, "system": name, "acc": 0.5 + s / 10} for s in (0, 1) for name in ("naivemc", "damc")],
            "by_count": {"option_score": {str(k): {"naivemc": r(0.8), "damc": r(0.7 + k / 100)} for k in (2, 3, 4)}}}
    text = "\n".join(sections.damc_section(part))
    assert "Protocol: `letter`" in text and "Protocol: `option_score`" in text
    assert "| damc | 0.700 [0.60, 0.80] |" in text
    assert "| ('MCUB-4', 'tuned') | 0.500 | 0.250 | 0.250 | 0.100 | 0.720 |" in text
    assert "| damc | 0.930 | the decoupled models |" in text
    assert "| image | original |" not in text and "| image | damc | 0.50 | 0.30 | 0.20 | 10 |" in text
    assert "| damc | 0.500 | 0.600 |" in text                   # seeds 0 and 1
    assert "| ('option_score', 3, 'damc') | 0.730 | 0.630-0.830 | 40 |" in text


def test_mmer_section_has_every_protocol_retention_beside_the_paper_the_sweep_forgetting_and_storage():
    def r(acc):
        return {"acc": acc, "ci95": [acc - 0.1, acc + 0.1], "n": 40}

    shares = {"own": 0.9, "other": 0.05, "invalid": 0.05, "n": 10}
    part = {"mcub": {"MCUB-4": {"results": {p: {"naivemc": r(0.6), "mmer": r(0.8)} for p in ("letter", "option_score")},
                                "lambdas": {"mmer_tuned": {"lam": [1.0, 0.8, 0.6, 1.2], "val": 0.9, "trace": []},
                                            "ta_dare": {"lam": 0.5, "val": 0.8}}}},
            "single": {"retention": {"naivemc": 0.81, "mmer": 0.995},
                       "conflict": {"audio": {"original": shares, "naivemc": shares, "mmer": shares}}},
            "sensitivity": [{"keep": k, "lam": lam, "threshold_pct": 50 * lam, "expansion": 0.9, "retention": k,
                             "density": 0.5} for k in (0.4, 0.8) for lam in (0.6, 1.0)],
            "forgetting": {"modality": "image", "steps": 200, "old_retention": {"mmer": 0.98, "naivemc": 0.77},
                           "old_retention_modality": {"mmer": 0.97, "fine_tuned": 0.07},
                           "new": {"fine_tuned": r(0.8), "mmer": r(0.7)},
                           "new_vs_fine_tuned": {"fine_tuned": 1.0, "mmer": 0.875}},
            "density": {"image": 0.5, "audio": 0.25},
            "storage": {"base": 2**20, "tau_star": 2**20, "masks": 2**16, "mmer": 2**21 + 2**16,
                        "separate_models": 2**22}}
    text = "\n".join(sections.mmer_section(part))
    assert "Protocol: `letter`" in text and "Protocol: `option_score`" in text
    assert "| mmer | 0.800 [0.70, 0.90] |" in text
    assert "| MCUB-4 | 1.000 | 0.800 | 0.600 | 1.200 | 0.900 | 0.500 |" in text
    assert "| mmer | 0.995 | 99.400 |" in text and "| naivemc | 0.810 | 88.300 |" in text
    assert "| audio | mmer | 0.90 | 0.05 | 0.05 | 10 |" in text
    assert "| 0.4 | 0.400 | 0.400 |" in text                  # retention: K 0.4 at 30% and 50%
    assert "image model fine-tuned 200 steps" in text and "| mmer | 0.980 | 0.970 | 0.700 | 0.875 |" in text
    assert "audio 25.0% (paper 2.2%)" in text and "= 2.06 MiB, against 4.00 MiB" in text


def test_real_section_says_when_the_checkpoints_were_random():
    part = {"random_checkpoints": True, "split": "MCUB-4", "n": 8, "method": "ties", "lam": 0.3, "device": "cpu",
            "acc": 0.125, "ci95": [0.02, 0.47]}
    text = "\n".join(sections.real_section(part))
    assert "accuracy 0.125 [0.02, 0.47]" in text and "tiny random checkpoints" in text
    assert "real checkpoints)" in "\n".join(sections.real_section({**part, "random_checkpoints": False}))
