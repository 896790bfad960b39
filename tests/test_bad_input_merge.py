"""Bad input to the merge engine and command line: one row per case, each a one-line error naming the culprit.

Every case also checks that nothing was written (no output, no temporaries) and that
the inputs' bytes and modification times are unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _merge_helpers import fine_tuned, save_checkpoint, tiny_base

from mckit.merge import engine as E
from mckit.storage.atomic import MARKER, atomic_dir, atomic_write_text, remove_stale_temporaries

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ckpts(tmp_path):
    base = tiny_base(seed=0)
    root = tmp_path / "in"
    return {"root": root, "base": save_checkpoint(base, root / "base"),
            "experts": [save_checkpoint(fine_tuned(base, i), root / f"e{i}", sharded=(i == 1)) for i in range(2)]}


def _state(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under ``root``: a file's bytes and mtime, None for a directory or link."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() and not p.is_symlink()
            else None for p in sorted(root.rglob("*"))}


def _temporaries(*dirs: Path) -> list[str]:
    return [p.name for d in dirs if d.is_dir() for p in d.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _corrupt_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header with ``edit(header)`` (same length, space-padded)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


def _first_two(header):
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]


def _overlap(header):
    a, b = _first_two(header)
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][1]]
    header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]


def _gap(header):
    first = _first_two(header)[0]
    for name, meta in header.items():
        if name not in ("__metadata__", first):
            meta["data_offsets"] = [meta["data_offsets"][0] + 4, meta["data_offsets"][1] + 4]


def _past_end(header):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["shape"] = [header[last]["shape"][0] + 1, *header[last]["shape"][1:]]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin, end + (end - begin) // max(1, header[last]["shape"][0] - 1)]


def _set_up(case: str, c: dict, tmp: Path):
    """Prepare the inputs for ``case``; returns (keyword arguments of merge_checkpoints, output path)."""
    base, (e0, e1) = c["base"], c["experts"]
    kw = {"method": "ties", "base": base, "experts": [e0, e1]}
    out = tmp / "out"
    if case == "out is the base":
        out = base
    elif case == "out inside an expert":
        out = e0 / "merged"
    elif case == "out contains the inputs":
        out = c["root"]
    elif case == "out is a link to an expert":
        (tmp / "link").symlink_to(e1, target_is_directory=True)
        out = tmp / "link"
    elif case == "overwrite a foreign directory":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "overwrite a file":
        out.write_text("a file")
    elif case == "existing output without overwrite":
        E.merge_checkpoints("average", base, [e0, e1], out, progress=False)
    elif case == "same expert twice":
        kw["experts"] = [e0, e0]
    elif case == "base as expert":
        kw["experts"] = [e0, base]
    elif case == "config not JSON":
        (e0 / "config.json").write_text("{not json")
    elif case == "index not JSON":
        (e1 / E.INDEX_FILE).write_text("[1, 2")
    elif case == "index without weight_map":
        (e1 / E.INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    elif case in ("overlapping tensors", "gap between tensors", "tensor past the end"):
        edit = {"overlapping tensors": _overlap, "gap between tensors": _gap, "tensor past the end": _past_end}[case]
        _corrupt_header(e0 / E.SINGLE_FILE, edit)
        if case == "gap between tensors":
            with open(e0 / E.SINGLE_FILE, "ab") as f:
                f.write(bytes(4))
    elif case == "trailing bytes":
        with open(e0 / E.SINGLE_FILE, "ab") as f:
            f.write(bytes(8))
    return kw, out


CASES = [  # case, extra options, expected message fragment
    ("out is the base", {"overwrite": True}, "is, contains or lies inside the input"),
    ("out inside an expert", {"overwrite": True}, "is, contains or lies inside the input"),
    ("out contains the inputs", {"overwrite": True}, "is, contains or lies inside the input"),
    ("out is a link to an expert", {"overwrite": True}, "is, contains or lies inside the input"),
    ("overwrite a foreign directory", {"overwrite": True}, "is not an output of the kit"),
    ("overwrite a file", {"overwrite": True}, "is not an output of the kit"),
    ("existing output without overwrite", {}, "already exists; pass overwrite=True"),
    ("same expert twice", {}, "is the same checkpoint as expert"),
    ("base as expert", {}, "is the same checkpoint as the base"),
    ("include matches nothing", {"include": r"nothing\.here"}, "matches no tensor of the base"),
    ("include not a regex", {"include": "(("}, "is not a valid regular expression"),
    ("lam NaN", {"lam": math.nan}, "lam must be a finite number"),
    ("lam infinite", {"lam": math.inf}, "lam must be a finite number"),
    ("negative steps", {"method": "wudi", "steps": -3}, "steps must be a whole number >= 0"),
    ("keep zero", {"keep": 0.0}, "keep must be in (0, 1]"),
    ("drop one", {"method": "dare_ta", "drop": 1.0}, "drop must be in [0, 1)"),
    ("option of another method", {"method": "average", "keep": 0.5}, "do not apply to method average"),
    ("unknown method", {"method": "magic"}, "unknown merge method 'magic'"),
    ("global scope for TA", {"method": "task_arithmetic", "scope": "global"}, "scope='global' applies to ties"),
    ("config not JSON", {}, "config.json is not valid JSON"),
    ("index not JSON", {}, "model.safetensors.index.json is not valid JSON"),
    ("index without weight_map", {}, "has no weight_map object"),
    ("overlapping tensors", {}, "overlaps the tensor before it"),
    ("gap between tensors", {}, "leaves a gap before it"),
    ("trailing bytes", {}, "the tensors' data ends at byte"),
    ("tensor past the end", {}, "do not match shape"),
]


@pytest.mark.parametrize("case, options, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(ckpts, tmp_path, case, options, message):
    kw, out = _set_up(case, ckpts, tmp_path)
    before = _state(tmp_path)
    with pytest.raises(ValueError) as err:
        E.merge_checkpoints(out=out, progress=False, **{**kw, **options})
    text = str(err.value)
    assert message in text and "\n" not in text, text
    # nothing written, nothing left behind: inputs and any existing output keep their bytes and mtimes
    assert _state(tmp_path) == before


def test_cli_prints_one_line_and_exits_2(ckpts, tmp_path):
    cmd = [sys.executable, "-m", "mckit", "merge", "--method", "ties", "--base", str(ckpts["base"]), "--models",
           str(ckpts["experts"][0]), str(ckpts["base"]), "--out", str(tmp_path / "o"), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "same checkpoint as the base" in done.stderr


def test_output_directories_get_normal_permissions(ckpts, tmp_path):
    out = E.merge_checkpoints("average", ckpts["base"], ckpts["experts"], tmp_path / "out", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / MARKER).is_file()


_SLOW_MERGE = """
import sys, time
import mckit.merge.engine as E
original = E.merge_array
def slow(*args, **kwargs):
    time.sleep(0.3)
    return original(*args, **kwargs)
E.merge_array = slow
E.merge_checkpoints("dare_ties", sys.argv[1], sys.argv[2:4], sys.argv[4], progress=False)
"""


def _start_slow_merge(c, out):
    args = [sys.executable, "-c", _SLOW_MERGE, str(c["base"]), *map(str, c["experts"]), str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 60
    while not _temporaries(out.parent) and time.time() < deadline:
        time.sleep(0.05)
    assert _temporaries(out.parent), "the merge never started writing"
    return proc


def test_sigterm_cleans_up_like_sigint(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_merge(ckpts, out)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists() and _temporaries(tmp_path) == []


def test_after_sigkill_the_next_write_removes_stale_temporaries_only(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_merge(ckpts, out)
    proc.kill()
    proc.wait(timeout=60)
    stale = _temporaries(tmp_path)
    assert stale and not out.exists()                                   # SIGKILL cannot clean up
    live = tmp_path / f".out.tmp-{os.getpid()}-live"                     # owned by a live process: this one
    live.mkdir()
    foreign = tmp_path / ".out.tmp-notes"                                # not the kit's naming: never touched
    foreign.mkdir()
    E.merge_checkpoints("average", ckpts["base"], ckpts["experts"], out, progress=False)
    left = _temporaries(tmp_path)
    assert not set(stale) & set(left) and live.name in left and foreign.name in left
    shutil.rmtree(live)


def test_every_atomic_writer_removes_its_own_stale_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".report.tmp-{pid}-x1"
    stale.mkdir()
    (stale / "half.json").write_text("{")
    with atomic_dir(tmp_path / "report") as tmp:
        (tmp / "results.json").write_text("{}")
    assert not stale.exists() and (tmp_path / "report" / "results.json").is_file()
    assert remove_stale_temporaries(tmp_path / "report") == []
    half_file = tmp_path / f".REPORT.md.tmp-{pid}-y2"
    half_file.write_text("# half")
    atomic_write_text(tmp_path / "REPORT.md", "# whole")
    assert not half_file.exists() and (tmp_path / "REPORT.md").read_text() == "# whole"
