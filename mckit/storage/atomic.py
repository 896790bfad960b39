"""Atomic output: directories built in a temporary sibling, files written to one, renamed into place on success.

Every directory the kit writes holds a marker file, :data:`MARKER`; ``overwrite``
only ever replaces a directory that has one (a previous output of the kit),
never an arbitrary directory or a file. Temporary siblings are named
``.{name}.tmp-{pid}-{random}`` (and ``.{name}.old-{pid}-{random}`` while an old
output is swapped out): an interrupted write (SIGINT or SIGTERM) removes its own;
one killed outright (SIGKILL) leaves one behind, which the next write to the same
output removes once no live process owns it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

#: File marking a directory as an output of the kit (safe to replace with ``overwrite``).
MARKER = ".mckit-output"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]+$")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the kit's temporaries of ``out`` whose owning process is gone; returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        match = _TEMP.match(path.name)
        if match and match["name"] == out.name and not _alive(int(match["pid"])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` unless ``out`` is absent, or ``overwrite`` is set and ``out`` is a kit output."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.is_symlink() or not out.is_dir() or not (out / MARKER).is_file():
        raise FileExistsError(f"{out} is not an output of the kit (no {MARKER} in it): it is never replaced; "
                              "remove it yourself or choose another output")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` like SIGINT does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _normal_permissions(path: Path) -> None:
    """Give a ``mkdtemp`` directory (0700) the permissions the umask gives a new directory."""
    path.chmod(0o777 & ~_umask())


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    On any exception (KeyboardInterrupt and SIGTERM included) the temporary directory is
    removed and ``out`` is left as it was. An existing ``out`` needs ``overwrite=True`` and
    must be an output of the kit (it holds :data:`MARKER`); it is moved aside first and
    removed after the new one is in place. The new directory gets :data:`MARKER`.
    """
    out = Path(out)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    with _terminate_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            (tmp / MARKER).write_text("written by mckit; `overwrite` may replace this directory\n")
            _normal_permissions(tmp)
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, moving a previous ``out`` aside first and deleting it afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    out.rename(trash / "old")
    tmp.rename(out)
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename: readers never see half a file."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (removed on any failure or SIGTERM)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with _terminate_as_interrupt():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            Path(tmp).chmod(0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
