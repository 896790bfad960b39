"""The reproduce job's plumbing: notebooks' parts land in results.json and REPORT.md."""

import json

from mckit.report import reproduce


def test_write_part_is_collected_into_results(tmp_path):
    parts = tmp_path / "parts"
    path = reproduce.write_part(parts, "mcub", {"retention": {"naivemc": 0.5}})
    assert path == parts / "mcub.json" and json.loads(path.read_text()) == {"retention": {"naivemc": 0.5}}
    assert [p.name for p in parts.iterdir()] == ["mcub.json"]  # no temporary file left behind
    results = reproduce.collect("smoke", {"06_mcub": 1.0}, parts)
    assert results["retention"] == {"naivemc": 0.5} and results["mode"] == "smoke"
    assert reproduce.write_part(None, "mcub", {}) is None


def test_notebooks_get_an_absolute_out(tmp_path, monkeypatch):
    """Notebooks run with notebooks/ as working directory: a relative OUT would write beside them."""
    import papermill

    seen = {}

    def fake_execute(src, dst, parameters, **kwargs):
        seen[src] = parameters

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    reproduce.run_notebooks(tmp_path, "smoke", "relative/parts")
    mcub = next(p for s, p in seen.items() if s.endswith("06_mcub.ipynb"))
    assert mcub["OUT"].startswith("/") and mcub["OUT"].endswith("relative/parts")
    assert all(p["MODE"] == "smoke" for p in seen.values())


def test_seed_section_reports_spread_and_gaps():
    rows = [{"seed": s, "system": name, "acc": acc, "ci_low": 0, "ci_high": 1, "n": 10}
            for s, accs in {0: (0.4, 0.7), 1: (0.5, 0.6)}.items() for name, acc in zip(("single:image", "naivemc"), accs)]
    rows[1]["gap_points"], rows[3]["gap_points"] = 30.0, 10.0
    text = "\n".join(reproduce.seed_section(rows))
    assert "| single:image | 0.400 | 0.500 | 0.100 |" in text
    assert "seed 0: +30.0, seed 1: +10.0" in text


def test_binder_requirements_are_generated_from_the_kits():
    from mckit.report.binder import SOURCE, TARGET, binder_requirements

    assert TARGET.read_text() == binder_requirements(SOURCE.read_text()), \
        "binder/requirements.txt is out of date: run `python -m mckit.report.binder`"
    pins = {line.split("==")[0] for line in SOURCE.read_text().splitlines() if "==" in line} - {"playwright"}
    assert pins == {line.split("==")[0] for line in TARGET.read_text().splitlines() if "==" in line}
    assert "torch==2.13.0+cpu" in binder_requirements("torch==2.13.0\nnumpy==2.4.6\n")
