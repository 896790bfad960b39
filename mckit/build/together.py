"""The toy world and the capability experts built together, on two cores.

``python -m mckit build-all`` runs :func:`mckit.build.world.build_world` in this process and, as soon
as the world's base LM exists, :func:`mckit.build.experts.build_experts` in a second process: the
experts need only the world's entities, tokenizer and base LM, so they train while the world trains
its modalities. Each process trains on one thread, so every weight is the one the two commands write
one after the other on one thread; both keep their finished stages, and a rerun resumes each.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import torch

from mckit.build.experts import ExpertsConfig, WorldParts, build_experts
from mckit.build.world import BuildConfig, build_world
from mckit.storage.atomic import check_replaceable
from mckit.world.entities import World


def build_all(world_out: str | Path, experts_out: str | Path, world_config: BuildConfig | None = None,
              experts_config: ExpertsConfig | None = None, overwrite: bool = False) -> tuple[dict, dict]:
    """Build the world into ``world_out`` and the experts on it into ``experts_out``, two processes at once.

    Returns the ``world.json`` and ``experts.json`` records. Both outputs are checked before anything
    trains; a failure of either process stops the other (finished stages stay, to resume from).
    """
    world_out, experts_out = Path(world_out), Path(experts_out)
    if world_out.resolve() == experts_out.resolve():
        raise ValueError(f"the world and the experts need two folders, both were given as {world_out}")
    for out in (world_out, experts_out):
        check_replaceable(out, overwrite)
    ctx = mp.get_context("spawn")
    loaded, experts = ctx.Event(), []

    def start_experts(world: World, tokenizer_dir: Path, base_dir: Path) -> None:
        proc = ctx.Process(target=_experts_process, name="experts", args=(
            str(experts_out), world, str(tokenizer_dir), str(base_dir), world_out.name, experts_config,
            overwrite, loaded))
        proc.start()
        experts.append(proc)
        while not loaded.wait(0.5):      # the world's stages move into its output at the end: read them first
            if not proc.is_alive():
                raise RuntimeError(f"the experts' build stopped before reading the world's base LM "
                                   f"(exit code {proc.exitcode})")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world_record = build_world(world_out, world_config, overwrite, after_base=start_experts)
        experts[0].join()
    except BaseException:
        for proc in experts:
            proc.terminate()
            proc.join()
        raise
    finally:
        torch.set_num_threads(threads)
    if experts[0].exitcode != 0:
        raise RuntimeError(f"the experts' build failed (exit code {experts[0].exitcode}); the world is built, "
                           f"and `python -m mckit build-experts --world {world_out} --out {experts_out}` resumes "
                           "the experts after their last finished stage")
    return world_record, json.loads((experts_out / "experts.json").read_text())


def _experts_process(out: str, world: World, tokenizer_dir: str, base_dir: str, world_name: str,
                     config: ExpertsConfig | None, overwrite: bool, loaded) -> None:
    """The second process: read the world's parts, say so, then build the experts on one thread."""
    torch.set_num_threads(1)
    parts = WorldParts.read(world, Path(tokenizer_dir), Path(base_dir), world_name)
    loaded.set()
    build_experts(out, parts, config, overwrite)


def add_parser(sub) -> None:
    p = sub.add_parser("build-all", help="build the toy world and the capability experts on it, two processes at "
                                         "once")
    p.add_argument("--world", default="data/world", help="the world's output directory (default: data/world)")
    p.add_argument("--experts", default="data/experts", help="the experts' output directory (default: data/experts)")
    p.add_argument("--preset", default="full", choices=["full", "smoke"])
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    p.set_defaults(func=_run)


def _run(args) -> int:
    world, experts = build_all(args.world, args.experts, BuildConfig.preset(args.preset),
                               ExpertsConfig.preset(args.preset), overwrite=args.overwrite)
    print(json.dumps({"world seconds": world["seconds"], "experts seconds": experts["seconds"]}, indent=1))
    return 0
