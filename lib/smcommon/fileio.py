"""Durable small-file writes: the one place that knows the crash-safe recipe.

``atomic_write`` replaces a file (mode 0600: the storage manager's state is
root's alone; ``private_dir`` makes its directories, mode 0700) so that a process killed (or a host crashed)
at any instant leaves either the old or the new content, never a torn one:
write a temp file beside it, fsync it, rename it over the target, fsync the
directory.  Temp names start with a dot and end in ``.tmp`` so readers of a
directory can skip (and cleaners remove) what a killed writer left.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, doc: Any, *, indent: int | None = 1) -> None:
    atomic_write(path, json.dumps(doc, sort_keys=True, indent=indent).encode() + b"\n")


def private_dir(path: Path | str) -> Path:
    """Make directory ``path`` and its missing parents, each mode 0700 (host
    state is root's alone); existing ones are left as they are."""
    path = Path(path)
    if path.is_dir():
        return path
    parent = path.parent
    if parent != path:
        private_dir(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return path


def fsync_dir(path: Path | str) -> None:
    """Make the entries of directory ``path`` durable (a no-op if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_durable(path: Path) -> bool:
    """Remove ``path`` and make the removal durable; False if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
