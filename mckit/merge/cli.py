"""``python -m mckit merge``: merge safetensors checkpoints with one of the kit's algorithms.

Example::

    python -m mckit merge --method ties --base BASE --models EXPERT1 EXPERT2 --out OUT --keep 0.2

Only the options given on the command line are passed to the method; an
option the method does not take (e.g. ``--keep`` with ``average``) is an
error.  Errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from mckit.merge.engine import DEFAULT_INCLUDE, merge_checkpoints
from mckit.merge.registry import METHODS, SEED, get, user_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``merge`` subcommand."""
    p = subparsers.add_parser("merge", help="merge fine-tuned checkpoints into their base (streaming)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=list(METHODS), help="merging algorithm")
    p.add_argument("--base", required=True, help="base checkpoint directory (theta_0)")
    p.add_argument("--models", required=True, nargs="+", help="fine-tuned checkpoint directories (theta_i)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    add_method_options(p)
    p.add_argument("--include", default=DEFAULT_INCLUDE,
                   help="regex of tensor names to merge, others are copied from the base "
                        "(default: the language model's q/k/v/o/gate/up/down_proj weights, never a vision or "
                        "audio tower's; '.*' = all)")
    p.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="accept experts with another vocab size (unmerged tensors come from the base)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def add_method_options(p: argparse.ArgumentParser) -> None:
    """Every merging method's options as flags (each once, with every method's default), ``--scope``, ``--seed``."""
    for option, methods in _options().items():
        defaults = ", ".join(f"{m}: {get(m).defaults()[option.name]}" for m in methods)
        kind = {"by": str, "steps": int}.get(option.name, float)
        p.add_argument(f"--{option.name.replace('_', '-')}", type=kind, choices=["count", "weight"] if kind is str
                       else None, help=f"{option.help} (default {defaults})")
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor",
                   help="TIES top-k per tensor or over all merged tensors (default tensor)")
    p.add_argument("--seed", type=int, default=SEED.default, help=f"{SEED.help} (default {SEED.default})")


def method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (the others keep the method's defaults)."""
    return {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k) is not None}


def _options() -> dict:
    """Each user option once (its first definition in the registry) -> the methods that take it."""
    out: dict = {}
    for name in METHODS:
        for option in get(name).options:
            if option.name in user_options(name):
                first = next((o for o in out if o.name == option.name), option)
                out.setdefault(first, []).append(name)
    return out


OPTION_NAMES = tuple(dict.fromkeys(o for m in METHODS for o in user_options(m)))


def run(args: argparse.Namespace) -> int:
    """Run the merge; returns 0, or 2 after printing a one-line error."""
    options = method_options(args)
    try:
        out = merge_checkpoints(args.method, args.base, args.models, args.out, include=args.include,
                                scope=args.scope, seed=args.seed, overwrite=args.overwrite,
                                allow_vocab_mismatch=args.allow_vocab_mismatch, progress=not args.quiet,
                                **options)
    except (ValueError, OSError, re.error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {len(args.models)} model(s) with {args.method} into {out}")
    return 0
