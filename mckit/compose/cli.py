"""``python -m mckit compose``: one model from real single-modality MLLMs on one language model.

Example::

    python -m mckit compose --method ties --base lmsys/vicuna-7b-v1.5-DIR \\
        --sources llava-1.5-7b-hf-DIR Video-LLaVA-7B-hf-DIR:video --out composed --keep 0.2

The sources' language models are merged over the base by the streaming engine;
each source's towers and projectors are copied as branches (``SOURCE:image,video``
picks them; by default every modality the source gives; ``SOURCE:text`` merges its
language model and copies no branch). ``--method damc`` composes decoupled sources: each carries peft LoRA
adapters ``adapters/text/`` and ``adapters/MODALITY/`` over the base's language model (``--lam``: the text
LoRAs' coefficients, default 1/N). Open the result with
``mckit.compose.checkpoints.load_composed(OUT, device_map="auto", dtype=torch.bfloat16)``.
Errors print one line to stderr and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse

from mckit.merge.cli import add_method_options, method_options
from mckit.merge.registry import METHODS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``compose`` subcommand."""
    p = subparsers.add_parser("compose", help="compose real MLLMs: merged language model + each source's branches",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=[*METHODS, "mmer", "damc"],
                   help="merging algorithm for the language model; mmer: TIES + a mask per modality, routed; "
                        "damc: decoupled sources (SOURCE/adapters/text + SOURCE/adapters/MODALITY), routed")
    p.add_argument("--base", required=True, help="the base language model's folder (or an MLLM built on it)")
    p.add_argument("--sources", required=True, nargs="+",
                   help="source MLLM folders, optionally SOURCE:MOD,MOD (SOURCE:text: its LLM only)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    add_method_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an output folder written by the kit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from mckit.compose.checkpoints import compose_checkpoints

    out = compose_checkpoints(args.method, args.base, args.sources, args.out, overwrite=args.overwrite,
                              progress=not args.quiet, scope=args.scope, seed=args.seed, **method_options(args))
    print(f"composed {len(args.sources)} source(s) with {args.method} into {out}")
    return 0
