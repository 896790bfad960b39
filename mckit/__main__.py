"""Command line: ``python -m mckit {build-world,build-mcub,reproduce,merge} ...``.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``
registering the subcommand with ``func=`` set to the function that runs it.
Only the chosen subcommand's module is imported, so ``merge`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {"build-world": "mckit.build", "build-mcub": "mckit.mcub", "reproduce": "mckit.reproduce",
               "merge": "mckit.merge_cli"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mckit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = [SUBCOMMANDS[argv[0]]] if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS.values()
    for name in chosen:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
