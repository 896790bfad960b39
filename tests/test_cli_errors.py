"""The command line's bad input: one line on stderr, exit status 2, nothing written, before any training."""

from __future__ import annotations

import pytest

from mckit.__main__ import main


@pytest.mark.parametrize("argv, message", [
    (["build-experts", "--world", "{tmp}/nowhere", "--out", "{tmp}/experts", "--preset", "smoke"], "no toy world at"),
    (["build-seeds", "--world", "{tmp}/nowhere", "--seeds", "1"], "no toy world at"),
    (["build-seeds", "--seeds", "0"], "seed 0 is the world's own training seed"),
    (["build-world", "--out", "{tmp}/file", "--preset", "smoke", "--overwrite"], "is not an output of the kit"),
    (["build-mcub", "--out", "{tmp}/foreign", "--overwrite"], "is not an output of the kit"),
    (["reproduce", "--out", "{tmp}/foreign", "--mode", "smoke"], "is not an output of the kit"),
    (["build-mcub", "--out", "{tmp}/mcub", "--n-test", "-5"], "n_test (--n-test) must be a whole number >= 1, got -5"),
    (["build-mcub", "--out", "{tmp}/mcub", "--n-val", "0"], "n_val (--n-val) must be a whole number >= 1, got 0"),
])
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
