"""``python -m mckit build-cache``: compute the slow experiments at full size and store them under data/results.

The notebooks' default runs show these stored values when their parameters and
input files match (:mod:`mckit.experiments.cached`); ``MODE = "full"`` recomputes
them. Resumable: an experiment already stored for today's parameters and inputs
is skipped (``--overwrite`` recomputes it).
"""

from __future__ import annotations

from pathlib import Path

from mckit.experiments.cached import EXPERIMENTS, RESULTS_DIR, compute, lookup, read, store


def build_cache(out: str | Path | None = None, only: list[str] | None = None, overwrite: bool = False) -> dict:
    """Store every experiment of :data:`EXPERIMENTS` (or ``only`` those) under ``out``; returns seconds per name."""
    names = list(only or EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"--only: unknown experiment(s) {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")
    out = Path(out or RESULTS_DIR)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    for name in names:
        read(name, out)                     # an unreadable file in the way is an error before any work
    seconds = {}
    for name in names:
        params = EXPERIMENTS[name].full
        record, why = lookup(name, params, out)
        if record is not None and not overwrite:
            print(f"{name}: up to date, skipped")
            continue
        print(f"{name}: computing ({why or 'overwrite'})")
        value, seconds[name] = compute(name, **params)
        store(name, value, params, seconds[name], out)
        print(f"{name}: stored in {seconds[name]:.0f} s")
    return seconds


def add_parser(sub) -> None:
    p = sub.add_parser("build-cache", help="store the slow experiments' full-size results for the notebooks' "
                                           "default runs")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--overwrite", action="store_true", help="recompute experiments that are up to date")
    p.set_defaults(func=lambda args: build_cache(args.out, args.only, args.overwrite) and 0)
