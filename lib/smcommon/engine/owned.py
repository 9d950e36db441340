"""Which volumes of an SR the SR itself made: the ownership records.

This module owns ``<sr dir>/.sm/owned/``: one empty file per volume the SR
created (``.sm/owned/<volume>``).  A volume's record is written (and its
directory entry fsync'd) *before* the volume is created, so a kill at any
instant leaves no volume of ours without its record; a record whose volume
does not exist (a kill before the create, or after a delete) is harmless and
dropped by ``prune``.

The collector and every engine path delete, move or rewrite only volumes
that are owned (``owned()``, plus every volume of the chain of a VDI record,
see ``OwnershipView``): a file someone copied into the SR directory is never
touched.  SR.scan adopts valid foreign VHDs (``smcommon.engine.foreign``),
which makes them owned.

Migration: an SR made by an earlier version has no ``owned/`` directory.
``migrate`` records the volumes the VDI records need (leaves, epoch bases and
their chains) and nothing else, all at once: the markers are written in a
temp directory that is renamed to ``owned/`` (a kill leaves no half-done
set; the temp is rebuilt by the next attempt).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from smcommon.fileio import fsync_dir
from smcommon.paths import safe_name

OWNED = "owned"
_TMP = ".owned.tmp"


class Ownership:
    """The ownership records of one SR (``<sm_dir>/owned``)."""

    def __init__(self, sm_dir: Path) -> None:
        self.sm_dir = Path(sm_dir)
        self.dir = self.sm_dir / OWNED

    def ready(self) -> bool:
        """False for an SR made before ownership records existed."""
        return self.dir.is_dir()

    def init(self) -> None:
        """An empty record set (SR.create)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.sm_dir)

    def owned(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.dir) if not n.startswith(".")}
        except FileNotFoundError:
            return set()

    def is_owned(self, volume: str) -> bool:
        return os.path.exists(self.dir / safe_name("volume", volume))

    def record(self, *volumes: str) -> None:
        """Record ``volumes`` as the SR's own, durably (before they are made)."""
        if not volumes:
            return
        if not self.ready():
            self.init()
        for v in volumes:
            path = self.dir / safe_name("volume", v)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
        fsync_dir(self.dir)

    def forget(self, *volumes: str) -> None:
        """Drop the records of volumes that no longer exist."""
        gone = False
        for v in volumes:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / safe_name("volume", v))
                gone = True
        if gone:
            fsync_dir(self.dir)

    def prune(self, existing: Iterable[str]) -> list[str]:
        """Forget records of volumes that do not exist (caller holds the SR lock)."""
        stale = sorted(self.owned() - set(existing))
        self.forget(*stale)
        return stale

    def migrate(self, needed: Iterable[str]) -> None:
        """Create the record set of an SR made by an earlier version."""
        import shutil  # rare: shutil imports zlib, bz2 and lzma, which a call pays for

        tmp = self.sm_dir / _TMP
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for v in sorted(set(needed)):
            fd = os.open(
                tmp / safe_name("volume", v), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
            )
            os.close(fd)
        fsync_dir(tmp)
        os.rename(tmp, self.dir)
        fsync_dir(self.sm_dir)
