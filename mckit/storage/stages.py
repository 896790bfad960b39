"""Resumable builds: each finished stage of a long build is kept in a hidden sibling of its output.

``data/experts`` builds through ``data/.experts.stages/``: a stage writes its
files into a temporary folder beside its final place and is renamed there when
it finishes, with its record in ``meta/{stage}.json``. A rerun of the same
build (same ``key``: settings and inputs) reuses every finished stage; another
key starts afresh. When the build succeeds its stages are moved into the output
and the folder is removed. An interrupted stage leaves only its temporary
folder, which the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from mckit.storage.atomic import atomic_write_text


class Stages:
    """The finished stages of one build of ``out`` with settings ``key`` (JSON-serialisable)."""

    def __init__(self, out: str | Path, key: dict):
        out = Path(out)
        self.root = out.parent / f".{out.name}.stages"
        key_file = self.root / "key.json"
        if self.root.exists() and (not key_file.is_file() or json.loads(key_file.read_text()) != _plain(key)):
            shutil.rmtree(self.root)
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, json.dumps(_plain(key), indent=1))

    def done(self, name: str) -> dict | None:
        """The record a finished stage ``name`` left, or None when it has not finished."""
        meta = self._meta(name)
        return json.loads(meta.read_text()) if meta.is_file() else None

    def path(self, name: str) -> Path:
        """Where stage ``name``'s files live once it has finished."""
        return self.root / name

    @contextlib.contextmanager
    def run(self, name: str) -> Iterator[Path]:
        """A path, beside the stage's final place (same depth, so relative links hold), for the stage to
        create its folder at; on success it is renamed into place. Record the stage with :meth:`finish`."""
        final = self.path(name)
        tmp = final.parent / f".{final.name}.running"
        for stale in (tmp, final):
            if stale.exists():
                shutil.rmtree(stale)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(final)

    def finish(self, name: str, record: dict) -> None:
        """Mark stage ``name`` finished with its ``record`` (written last and whole: a stage without it is
        redone)."""
        atomic_write_text(self._meta(name), json.dumps(record))

    def move_into(self, out: Path, names: list[str]) -> None:
        """Move the files of the finished stages ``names`` to the same relative places under ``out``."""
        for name in names:
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.path(name).rename(target)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _meta(self, name: str) -> Path:
        return self.root / "meta" / f"{name.replace('/', '__')}.json"


def _plain(obj):
    return json.loads(json.dumps(obj))
