"""A folder's content fingerprint: which exact inputs a stored result was computed from."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_fingerprint(path: str | Path) -> str:
    """sha256 over every file under ``path``: its relative name, its size and its bytes, in sorted order.

    Hidden entries (the kit's output markers, temporaries of an interrupted write) are
    left out, so they never change the fingerprint; a missing folder is an error.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder to fingerprint")
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
