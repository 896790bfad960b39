"""Where the repository's shipped files live (``data/``, ``notebooks/``), wherever the kit is installed from."""

from __future__ import annotations

from pathlib import Path

#: The repository root: the folder holding ``mckit/``, ``data/`` and ``notebooks/``.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Shipped data: ``data/world``, ``data/experts``, ``data/mcub``.
DATA_DIR = REPO_ROOT / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
