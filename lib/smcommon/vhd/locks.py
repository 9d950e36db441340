"""Locking an image file: one writer at a time, readers never see a half-done change.

``lock_file`` takes an flock on the image's open file (exclusive to write,
shared to read) with a bounded wait, then raises Busy.  An ``Image`` holds
its lock from open to close (coalesce releases the parent's between batches).
"""

from __future__ import annotations

from smcommon.lock import flock_wait
from smcommon.vhd.errors import Busy, from_os_error

LOCK_TIMEOUT = 60.0


def lock_file(fd: int, path: str, *, exclusive: bool, timeout: float | None = None) -> None:
    """flock ``fd``: exclusive for a writer, shared for a reader; bounded wait, then Busy.

    One writer at a time per image, and readers never see a half-done
    allocation (the writer holds its lock from open to close).  Locks belong to
    the open file: two Image objects on one file in one process exclude each
    other too.
    """
    bound = LOCK_TIMEOUT if timeout is None else timeout
    try:
        if flock_wait(fd, shared=not exclusive, timeout=bound):
            return
    except OSError as exc:
        raise from_os_error(path, exc, "locking") from None
    kind = "writing" if exclusive else "reading"
    raise Busy(f"{path}: in use by another process; could not lock it for "
               f"{kind} within {bound:g}s")
