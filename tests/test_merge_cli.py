"""``python -m mckit merge`` end to end on tiny Llama checkpoints."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _merge_helpers import (
    fine_tuned,
    load_checkpoint,
    one_thread,  # noqa: F401  (fixture)
    save_checkpoint,
    tiny_base,
)

from mckit.merge import cli as merge_cli
from mckit.merge import methods as M
from mckit.merge.registry import tensor_seed
from mckit.merge.thresholds import global_magnitude_thresholds

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_base(seed=1)
    experts = [fine_tuned(base, seed=10 + i) for i in range(2)]
    return {"base": save_checkpoint(base, root / "base"), "base_sd": base, "expert_sds": experts,
            "experts": [save_checkpoint(e, root / f"e{i}", sharded=(i == 0)) for i, e in enumerate(experts)]}


def _main(argv):
    parser = argparse.ArgumentParser()
    merge_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _args(ckpts, out, *extra):
    return ["merge", "--base", str(ckpts["base"]), "--models", *map(str, ckpts["experts"]),
            "--out", str(out), "--quiet", *extra]


def test_ties_options_reach_the_engine(ckpts, tmp_path):
    out = tmp_path / "out"
    assert _main(_args(ckpts, out, "--method", "ties", "--keep", "0.3", "--lam", "0.8", "--by", "weight")) == 0
    got = load_checkpoint(out)
    name = "model.layers.1.mlp.gate_proj.weight"
    ref = M.ties(ckpts["base_sd"][name], [e[name] for e in ckpts["expert_sds"]], keep=0.3, lam=0.8, by="weight")
    torch.testing.assert_close(got[name], ref)
    assert torch.equal(got["model.norm.weight"], ckpts["base_sd"]["model.norm.weight"])


def test_include_everything_and_global_scope(ckpts, tmp_path):
    out = tmp_path / "out"
    assert _main(_args(ckpts, out, "--method", "ties", "--scope", "global", "--include", ".*")) == 0
    got = load_checkpoint(out)
    thresholds = global_magnitude_thresholds(ckpts["base_sd"], ckpts["expert_sds"], 0.2)
    for name, theta_0 in ckpts["base_sd"].items():
        ref = M.ties(theta_0, [e[name] for e in ckpts["expert_sds"]], thresholds=thresholds)
        torch.testing.assert_close(got[name], ref)


def test_dare_seed_changes_result(ckpts, tmp_path):
    for seed in ("1", "2"):
        assert _main(_args(ckpts, tmp_path / seed, "--method", "dare_ta", "--drop", "0.5", "--seed", seed)) == 0
    a, b = load_checkpoint(tmp_path / "1"), load_checkpoint(tmp_path / "2")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], b[name])
    ref = M.dare_ta(ckpts["base_sd"][name], [e[name] for e in ckpts["expert_sds"]], drop=0.5,
                    seed=tensor_seed(1, name))
    torch.testing.assert_close(a[name], ref)


@pytest.mark.parametrize("extra, message", [
    (["--method", "ties", "--keep", "1.5"], "error: keep must be in (0, 1], got 1.5"),
    (["--method", "dare_ties", "--drop", "1"], "error: drop must be in [0, 1), got 1.0"),
    (["--method", "average", "--keep", "0.5"], "error: option(s) keep do not apply to method average"),
    (["--method", "iso_c", "--scope", "global"], "error: scope='global' applies to ties, dare_ties, not iso_c"),
    (["--method", "ties", "--include", "("], "error: --include '(' is not a valid regular expression"),
])
def test_errors_one_line_exit_2(ckpts, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert _main(_args(ckpts, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_existing_output_refused_then_overwritten(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert _main(_args(ckpts, out, "--method", "average")) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert _main(_args(ckpts, out, "--method", "average", "--overwrite")) == 2     # not an output of the kit
    assert "is not an output of the kit" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    out.rmdir()
    assert _main(_args(ckpts, out, "--method", "average")) == 0
    first = (out / "model.safetensors").read_bytes()
    assert _main(_args(ckpts, out, "--method", "task_arithmetic", "--overwrite")) == 0    # a kit output: replaced
    assert (out / "model.safetensors").read_bytes() != first and (out / ".mckit-output").is_file()


def test_python_dash_m_entry_point(ckpts, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mckit", *_args(ckpts, tmp_path / "out", "--method", "task_arithmetic",
                                                  "--lam", "0.5")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "merged 2 model(s) with task_arithmetic" in done.stdout
    missing = [a if a != str(ckpts["base"]) else str(tmp_path / "nope") for a in cmd]
    missing[missing.index("--out") + 1] = str(tmp_path / "out2")
    done = subprocess.run(missing, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().endswith(f"checkpoint directory not found: {tmp_path / 'nope'}")
