"""``binder/requirements.txt`` generated from ``requirements.txt``: the same pins, torch from the CPU index.

Binder builds from ``binder/`` only. Its requirements must be the kit's own, except
that torch comes from PyTorch's CPU index (the default wheel pulls CUDA, several GB).
``python -m mckit.report.binder`` rewrites the file; a test fails when it is out of date.
"""

from __future__ import annotations

import re

from mckit.storage.atomic import atomic_write_text
from mckit.storage.paths import REPO_ROOT

SOURCE = REPO_ROOT / "requirements.txt"
TARGET = REPO_ROOT / "binder" / "requirements.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Needed only by the test suite's browser test, not by anyone running the notebooks on Binder.
TEST_ONLY = ("playwright",)
HEADER = ("# Generated from ../requirements.txt by `python -m mckit.report.binder`; do not edit by hand.\n"
          "# Binder: CPU-only torch from the PyTorch CPU index, the rest as pinned in ../requirements.txt.\n")


def binder_requirements(requirements: str) -> str:
    """The Binder requirements for the text of ``requirements.txt``: torch pinned to its ``+cpu`` build,
    the browser-test driver left out."""
    lines = [HEADER + f"--extra-index-url {CPU_INDEX}"]
    for line in requirements.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line.split("==")[0].strip() in TEST_ONLY:
            continue
        lines.append(re.sub(r"^torch==([^+\s]+)$", r"torch==\1+cpu", line.strip()))
    return "\n".join(lines) + "\n"


def sync() -> bool:
    """Rewrite ``binder/requirements.txt``; returns whether it changed."""
    text = binder_requirements(SOURCE.read_text())
    if TARGET.is_file() and TARGET.read_text() == text:
        return False
    atomic_write_text(TARGET, text)
    return True


if __name__ == "__main__":
    print("rewrote" if sync() else "already in sync", TARGET)
