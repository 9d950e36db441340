"""The engine's locks: one per SR (tree changes), one per VDI (datapaths).

Lock files live under ``Paths.lock_dir``; the locks are fcntl locks, so the
kernel drops them when a process dies, and every wait is bounded: a lock not
taken in time raises ``LockTimeout`` (it reaches the wire as
``Backend_error(LOCK_TIMEOUT, ...)``).  Order: the SR lock, then VDI locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from smcommon.errors import LockTimeout
from smcommon.paths import Paths, safe_name

ENV_TIMEOUT = "SM_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 30.0


def default_timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def sr_lock_path(paths: Paths, sr: str) -> Path:
    return paths.lock_dir / f"sr-{safe_name('sr', sr)}.lock"


def vdi_lock_path(paths: Paths, sr: str, vdi: str) -> Path:
    return paths.lock_dir / f"vdi-{safe_name('sr', sr)}-{safe_name('vdi', vdi)}.lock"


@contextlib.contextmanager
def flock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if missing)."""
    _lock = _smcommon_lock()
    wait = default_timeout() if timeout is None else timeout
    if _lock is not None:
        with _lock(path, wait):
            yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(path.name, wait)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)


def _smcommon_lock() -> object | None:
    """smcommon.lock's context manager, when the runtime provides one."""
    return None
