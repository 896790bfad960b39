"""Command line: ``python -m mckit SUBCOMMAND ...`` (build-world, build-seeds, build-mcub, build-experts,
build-all, build-cache, reproduce, merge, compose).

Each subcommand lives in a module that exposes a function (``add_parser`` unless
named after a colon) registering the subcommand with ``func=`` set to the
function that runs it. Only the chosen subcommand's module is imported, so
``merge`` starts fast. Bad input (a missing world, an existing output, a wrong
option) prints one line, ``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {"build-world": "mckit.build.world", "build-seeds": "mckit.build.world:add_replicas_parser",
               "build-mcub": "mckit.eval.mcub", "build-experts": "mckit.build.experts",
               "build-all": "mckit.build.together", "build-cache": "mckit.build.cache",
               "reproduce": "mckit.report.reproduce", "merge": "mckit.merge.cli", "compose": "mckit.compose.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mckit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = [SUBCOMMANDS[argv[0]]] if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS.values()
    for spec in chosen:
        module, _, register = spec.partition(":")
        getattr(importlib.import_module(module), register or "add_parser")(sub)
    args = parser.parse_args(argv)
    if "torch" in sys.modules:                      # the command trains or evaluates: threads that fit the CPU
        from mckit.storage.cpus import usable_cpus

        sys.modules["torch"].set_num_threads(usable_cpus())
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:           # bad input (a file, an option, an existing output)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
