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

from mckit.engine import DEFAULT_INCLUDE, merge_checkpoints
from mckit.merge_options import METHOD_OPTIONS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``merge`` subcommand."""
    p = subparsers.add_parser("merge", help="merge fine-tuned checkpoints into their base (streaming)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=list(METHOD_OPTIONS), help="merging algorithm")
    p.add_argument("--base", required=True, help="base checkpoint directory (theta_0)")
    p.add_argument("--models", required=True, nargs="+", help="fine-tuned checkpoint directories (theta_i)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--lam", type=float, help="scale of the merged task vector (default 1.0)")
    p.add_argument("--keep", type=float, help="TIES: fraction of entries KEPT per task vector (ties: 0.2, dare_ties: 1.0)")
    p.add_argument("--drop", type=float, help="DARE: drop probability (default 0.2)")
    p.add_argument("--by", choices=["count", "weight"], help="TIES disjoint mean divisor (default count)")
    p.add_argument("--rank-ratio", type=float, help="OptMerge: rank k as a fraction of min(m, d) (default 1/n)")
    p.add_argument("--steps", type=int, help="WUDI/OptMerge: optimiser steps (default 300)")
    p.add_argument("--lr", type=float, help="WUDI/OptMerge: learning rate")
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor",
                   help="TIES top-k per tensor or over all merged tensors (default tensor)")
    p.add_argument("--seed", type=int, default=0, help="DARE seed (default 0)")
    p.add_argument("--include", default=DEFAULT_INCLUDE,
                   help="regex of tensor names to merge, others are copied from the base "
                        "(default: the 2-D linear weights q/k/v/o/gate/up/down_proj; '.*' = all)")
    p.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="accept experts with another vocab size (unmerged tensors come from the base)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


OPTION_NAMES = ("lam", "keep", "drop", "by", "rank_ratio", "steps", "lr")


def run(args: argparse.Namespace) -> int:
    """Run the merge; returns 0, or 2 after printing a one-line error."""
    options = {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k) is not None}
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
