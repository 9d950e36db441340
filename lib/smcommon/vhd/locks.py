"""Locking an image file: one writer at a time, readers never see a half-done change.

``lock_file`` takes an flock on the image's open file (exclusive to write,
shared to read) with a bounded wait, then raises Busy.  An ``Image`` holds
its lock from open to close (coalesce releases the parent's between batches).
"""

from __future__ import annotations

import fcntl
import time

from smcommon.vhd.errors import Busy, from_os_error

LOCK_TIMEOUT = 60.0
LOCK_POLL = 0.005


def lock_file(fd: int, path: str, *, exclusive: bool, timeout: float | None = None) -> None:
    """flock ``fd``: exclusive for a writer, shared for a reader; bounded wait, then Busy.

    One writer at a time per image, and readers never see a half-done
    allocation (the writer holds its lock from open to close).  Locks belong to
    the open file: two Image objects on one file in one process exclude each
    other too.
    """
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + (LOCK_TIMEOUT if timeout is None else timeout)
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                kind = "writing" if exclusive else "reading"
                raise Busy(f"{path}: in use by another process; could not lock it for "
                           f"{kind} within {LOCK_TIMEOUT if timeout is None else timeout:g}s") from None
            time.sleep(LOCK_POLL)
        except OSError as exc:
            raise from_os_error(path, exc, "locking") from None
