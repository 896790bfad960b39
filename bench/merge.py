"""Benchmark: mckit's streaming merge engine against mergekit on a ~200M-parameter Llama.

    .venv/bin/python bench/merge.py [--dir DIR] [--repeat N]

1. Creates (unless --dir points to them) a base Llama (hidden 1024, 10 layers,
   vocab 32000, about 194M parameters, fp32 safetensors) with seeded random
   weights and three "fine-tuned" copies (base + seeded Gaussian perturbations)
   under bench/.work/models.
2. Creates bench/.venv-mergekit (python -m venv, no system site packages):
   torch==2.13.0 from a local CPU wheel first, then mergekit==0.1.5 from PyPI.
3. Times, each in its own subprocess just after a read of every input (warm
   page cache): reading every input file once (raw reads, the I/O floor),
   mckit and mergekit for TIES (keep / density 0.2, per tensor) and for the
   plain average, all tensors merged by both tools (mckit --include '.*', as
   mergekit merges every tensor).  Wall time and peak RSS (os.wait4) of each
   child are taken by a small launcher process; every measurement runs
   --repeat times (default 3), each after a sync, and best and median are kept.  Prints ratios against the targets: TIES >= 20x
   faster than mergekit at <= 0.25x its peak memory; average within 1.5x of the
   read-once time.  Also checks that both tools' outputs agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
MK_VENV = HERE / ".venv-mergekit"
TORCH_WHEEL_DIRS = [Path("/opt/wheels"), Path.home() / ".cache" / "wheels"]
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=10,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
              tie_word_embeddings=False)


# ------------------------------------------------------------ model files
def make_models(models: Path, n_experts: int = 3) -> tuple[Path, list[Path]]:
    """Base = seeded N(0, 0.02) weights (norms = 1); expert i = base + N(0, 0.002) (seed i)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, expert_dirs = models / "base", [models / f"expert{i}" for i in range(n_experts)]
    config = LlamaConfig(**CONFIG, architectures=["LlamaForCausalLM"])
    if all((d / "model.safetensors").is_file() for d in [base_dir, *expert_dirs]):
        return base_dir, expert_dirs
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    print(f"parameters: {sum(v.numel() for v in base.values()) / 1e6:.1f} M", flush=True)
    for directory, state in [(base_dir, base)] + [(d, None) for d in expert_dirs]:
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
        if state is None:
            gi = torch.Generator().manual_seed(100 + expert_dirs.index(directory))
            state = {k: v + 0.002 * torch.randn(v.shape, generator=gi) for k, v in base.items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        del state
    return base_dir, expert_dirs


# -------------------------------------------------------------- mergekit
def mergekit_venv() -> Path:
    """bench/.venv-mergekit with the CPU torch wheel from local disk, then mergekit 0.1.5."""
    exe = MK_VENV / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe
    wheels = [w for d in TORCH_WHEEL_DIRS if d.is_dir() for w in d.glob("torch-2.13.0*cpu*.whl")]
    if not wheels:
        sys.exit("no local torch-2.13.0 CPU wheel found in " + ", ".join(map(str, TORCH_WHEEL_DIRS)))
    subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
    pip = [str(MK_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [str(wheels[0])], check=True)
    subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return exe


def mergekit_config(method: str, base: Path, experts: list[Path], keep: float) -> str:
    if method == "ties":
        models = "\n".join(f"  - model: {e}\n    parameters: {{density: {keep}, weight: 1.0}}" for e in experts)
        return (f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}\n"
                f"parameters: {{normalize: true}}\ndtype: float32\n")
    models = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0}}" for e in experts)
    return f"merge_method: linear\nmodels:\n{models}\nparameters: {{normalize: true}}\ndtype: float32\n"


# --------------------------------------------------------------- timing
# A child's peak RSS (ru_maxrss) is at least the RSS of the process it was forked
# or spawned from, so children are started by this small launcher (about 10 MiB),
# never by the benchmark process itself (about 400 MiB with torch imported).
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS of the child in MiB), both taken by the launcher."""
    with tempfile.TemporaryDirectory() as tmp:
        log, report = Path(tmp) / "log", Path(tmp) / "report"
        with open(log, "wb") as out:
            subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *cmd], cwd=ROOT, env=env,
                           stdout=out, stderr=out, check=True)
        wall, rss_kib, code = report.read_text().split()
        if int(code) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{log.read_text(errors='replace')[-3000:]}")
    return float(wall), int(rss_kib) / 1024


READ_ONCE = """
import sys
buf = bytearray(64 << 20)
view = memoryview(buf)
for path in sys.argv[1:]:
    with open(path, 'rb', buffering=0) as f:
        while f.readinto(view):
            pass
"""


def weight_files(dirs: list[Path]) -> list[str]:
    return [str(p) for d in dirs for p in sorted(d.glob("*.safetensors"))]


def max_abs_diff(a: Path, b: Path, names: list[str]) -> float:
    worst = 0.0
    fa, fb = weight_files([a]), weight_files([b])
    def find(files, name):
        for f in files:
            with safe_open(f, "pt") as h:
                if name in h.keys():
                    return h.get_tensor(name)
        raise KeyError(name)
    for name in names:
        worst = max(worst, float((find(fa, name) - find(fb, name)).abs().max()))
    return worst


def runs_of(repeat: int, make_cmd, out: Path, warm: list[str], env=None) -> list[tuple[float, float]]:
    """``repeat`` timed runs of ``make_cmd()``, each after removing ``out``, a ``sync`` and a read of ``warm``.

    The sync flushes the previous run's deletes and dirty pages first, so no run
    pays for its predecessor's clean-up (on this VM that alone moved an 800 MB
    write between 0.15 s and 2 s).  Reading the input files just before each
    run puts them back in the page cache: the VM evicts pages left cold for a
    few minutes, and the first run after a long mergekit merge paid for it
    (1.38 s against 0.34 s).
    """
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        timed([sys.executable, "-c", READ_ONCE, *warm])
        runs.append(timed(make_cmd(), env))
    return runs


def summary(runs: list[tuple[float, float]]) -> dict:
    """Best and median wall time, largest peak RSS, and every run."""
    walls = sorted(r[0] for r in runs)
    return {"wall_best": walls[0], "wall_median": walls[len(walls) // 2],
            "rss_mib": max(r[1] for r in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="existing models dir with base/ and expert*/ (default: generate)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best and median reported)")
    parser.add_argument("--keep", type=float, default=0.2)
    args = parser.parse_args()

    models = args.dir or WORK / "models"
    base, experts = make_models(models) if args.dir is None else \
        (models / "base", sorted(models.glob("expert*")))
    mergekit = mergekit_venv()
    outs = WORK / "out"
    outs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    inputs = weight_files([base, *experts])
    size_gb = sum(os.path.getsize(f) for f in inputs) / 1e9
    print(f"inputs: {len(experts)} experts + base, {size_gb:.2f} GB fp32; load average {os.getloadavg()[0]:.2f}")

    read = lambda files: lambda: [sys.executable, "-c", READ_ONCE, *files]   # noqa: E731
    results = {"read_once_all": runs_of(args.repeat, read(inputs), outs / "none", inputs),
               "read_once_experts": runs_of(args.repeat, read(weight_files(experts)), outs / "none", inputs),
               "python_startup": runs_of(args.repeat, lambda: [sys.executable, "-c", "import mckit.merge.engine"],
                                         outs / "none", inputs, env)}
    diffs = {}
    for method in ("ties", "average"):
        mk_out, mc_out = outs / f"mergekit-{method}", outs / f"mckit-{method}"
        cfg = WORK / f"mergekit-{method}.yml"
        cfg.write_text(mergekit_config(method, base, experts, args.keep))
        results[f"mergekit_{method}"] = runs_of(
            args.repeat, lambda: [str(mergekit), str(cfg), str(mk_out), "--quiet", "--no-cuda"], mk_out, inputs, env)
        extra = ["--keep", str(args.keep)] if method == "ties" else []
        results[f"mckit_{method}"] = runs_of(
            args.repeat, lambda: [sys.executable, "-m", "mckit", "merge", "--method", method, "--base", str(base),
                                  "--models", *map(str, experts), "--out", str(mc_out), "--include", ".*",
                                  "--quiet", *extra], mc_out, inputs, env)
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.9.mlp.down_proj.weight",
                 "model.norm.weight", "model.embed_tokens.weight"]
        diffs[method] = max_abs_diff(mk_out, mc_out, names)
    results = {key: summary(runs) for key, runs in results.items()}

    print(f"\n{'measurement':<22}{'best s':>9}{'median s':>10}{'peak RSS MiB':>14}")
    for key, r in results.items():
        print(f"{key:<22}{r['wall_best']:>9.2f}{r['wall_median']:>10.2f}{r['rss_mib']:>14.0f}")
    m = {k: r["rss_mib"] for k, r in results.items()}
    for stat in ("best", "median"):
        t = {k: r[f"wall_{stat}"] for k, r in results.items()}
        print(f"\n{stat} wall times:")
        print("TIES  speed-up vs mergekit: {:.2f}x (target >= 20x)".format(t["mergekit_ties"] / t["mckit_ties"]))
        print("avg   speed-up vs mergekit: {:.2f}x".format(t["mergekit_average"] / t["mckit_average"]))
        print("avg   time / read-once(all inputs): {:.2f} (target <= 1.5); / read-once(experts): {:.2f}".format(
            t["mckit_average"] / t["read_once_all"], t["mckit_average"] / t["read_once_experts"]))
    print("\nTIES  peak RSS mckit/mergekit: {:.2f} (target <= 0.25)".format(m["mckit_ties"] / m["mergekit_ties"]))
    print("avg   peak RSS mckit/mergekit: {:.2f}".format(m["mckit_average"] / m["mergekit_average"]))
    print("max |mckit - mergekit| on sample tensors: TIES {:.3g}, average {:.3g}".format(
        diffs["ties"], diffs["average"]))
    results["max_abs_diff"] = diffs
    (WORK / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
