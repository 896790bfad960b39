"""Command line: ``python -m mckit {build-world,reproduce,merge} ...``.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``
registering the subcommand with ``func=`` set to the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("mckit.build", "mckit.reproduce", "mckit.merge_cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mckit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
