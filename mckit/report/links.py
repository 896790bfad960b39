"""The public repository's name, kept in one place, and the launch links built from it.

Change :data:`REPO` here, then run ``python -m mckit.report.links`` to rewrite the
Binder/Colab links in README.md and every notebook.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mckit.storage.paths import NOTEBOOKS_DIR, REPO_ROOT

REPO = "OWNER/mckit"
BRANCH = "main"

#: Only launch links and the Colab clone are rewritten, never references to other projects.
_LINK = re.compile(r"(mybinder\.org/v2/gh/|colab\.research\.google\.com/github/|--depth 1 https://github\.com/)"
                   r"[\w.-]+/[\w.-]+?(?=/|\s|\\?\")")


def binder_url(notebook: str | None = None) -> str:
    path = f"?labpath=notebooks%2F{notebook}" if notebook else ""
    return f"https://mybinder.org/v2/gh/{REPO}/{BRANCH}{path}"


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{notebook}"


def badges(notebook: str) -> str:
    """Markdown badges opening ``notebook`` on Binder and Colab."""
    return (f"[![Binder](https://mybinder.org/badge_logo.svg)]({binder_url(notebook)}) "
            f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)})")


def colab_setup_source() -> str:
    """First code cell of every notebook: on Colab only, one shell call fetches the kit with its data.

    It clones the repository beside the notebook, links its ``mckit`` package into the working
    directory (so the running kernel imports it without a restart) and installs the kit's
    unpinned dependencies (Colab's CUDA torch stays).
    """
    return (
        "import sys\n"
        "if \"google.colab\" in sys.modules:  # Colab only: the kit and its data, without the pins\n"
        f"    !test -d mckit || (git clone -q --depth 1 https://github.com/{REPO} mckit-repo && "
        "ln -s mckit-repo/mckit mckit && pip install -q -e mckit-repo)"
    )


def _rewrite(text: str) -> str:
    return _LINK.sub(lambda m: m.group(1) + REPO, text)


def sync() -> list[Path]:
    """Rewrite every repository link in README.md and notebooks/*.ipynb to :data:`REPO`."""
    changed = []
    for path in [REPO_ROOT / "README.md", *sorted(NOTEBOOKS_DIR.glob("*.ipynb"))]:
        text = path.read_text()
        new = _rewrite(text)
        if new != text:
            if path.suffix == ".ipynb":
                json.loads(new)  # still valid JSON
            path.write_text(new)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in sync():
        print("rewrote", p)
