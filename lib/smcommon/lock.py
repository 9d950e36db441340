"""fcntl locks between the processes of a host, with bounded waits.

This module owns inter-process locking.  A ``Lock`` is an ``flock(2)`` on a
file under ``Paths.lock_dir`` (or a given directory): exclusive or shared,
used as a context manager.  The kernel drops it when its holder dies, even by
``kill -9``, so a crashed call never leaves an SR locked.

    with lock.sr_lock(paths, sr):                 # changes to the SR's tree
        with lock.vdi_lock(paths, sr, vdi):       # datapath changes of a VDI
            ...

- Waits are bounded: the lock is polled (``LOCK_NB``, short sleeps growing
  to ``MAX_POLL``) until ``timeout`` seconds have passed, then
  ``smcommon.errors.LockTimeout`` (on the wire: ``Backend_error
  LOCK_TIMEOUT``).  No signals (SIGALRM) are involved.
- Names are paths of safe components (``"sr/<uuid>"``): each component goes
  through ``safe_name``, so no request can put a lock file outside the lock
  directory.  Lock files are never deleted (deleting a lock file that another
  process has open would let two holders in).
- flock, not lockf: flock belongs to the open file, so two ``Lock`` objects
  on one file exclude each other even within one process (POSIX record locks
  do not, and closing any descriptor of the file drops them all).  A ``Lock``
  is re-entrant in the thread that holds it: taking the same name again in the
  same thread nests (a shared lock inside an exclusive one is fine; an
  exclusive one inside a shared one is refused, as it could deadlock).
- ``shared_storage=True`` makes it an fcntl lock instead, for lock files on
  storage several hosts mount (an SR on NFS): an open-file-description
  record lock (``F_OFD_SETLK``) on the whole file.  It belongs to the open
  file as flock does (same nesting rules), but it is a POSIX record lock,
  which NFS carries to the server (NLM for NFSv3, the protocol's own locks
  with leases for NFSv4), so it excludes processes of other hosts too, and it
  behaves the same on a local file system as on NFS.  (flock's behaviour
  differs: local only on some file systems, emulated as a record lock on
  Linux NFS.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from _thread import get_ident

from smcommon.errors import Error, LockTimeout
from smcommon.paths import safe_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from smcommon.paths import Paths

DEFAULT_TIMEOUT = 60.0  # seconds
FIRST_POLL = 0.001
MAX_POLL = 0.05

# Linux's open-file-description locks (fcntl(2)); Python >= 3.9 names them
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


class _Holding:
    """A lock file this process holds in one thread: its fd, mode and depth."""

    __slots__ = ("depth", "fd", "record", "shared")

    def __init__(self, fd: int, shared: bool, record: bool) -> None:
        self.fd = fd
        self.shared = shared
        self.record = record
        self.depth = 1


# (path, pid, thread id) -> what this process holds there, for nesting; the pid
# keeps a forked child from taking its parent's holding for its own
_held: dict[tuple[str, int, int], _Holding] = {}


class LockUnavailable(Error):
    """The file system holding a lock file refused record locks (ENOLCK)."""

    code = "LOCK_UNAVAILABLE"
    msg = (
        "the file system of lock {self.reason} refused a record lock (ENOLCK): "
        "on NFSv3 the server needs its lock manager (NLM) and the mount must "
        "not use nolock"
    )


class LockUpgrade(Error):
    """An exclusive lock was asked for while this thread holds it shared."""

    code = "LOCK_UPGRADE"
    msg = "lock {self.reason} is held shared by this thread; it cannot be taken exclusive inside"


def lock_path(name: str, lock_dir: str | os.PathLike[str]) -> str:
    """The file of lock ``name`` (``"a/b"`` -> ``<lock_dir>/a/b.lock``)."""
    parts = name.split("/")
    for part in parts:
        safe_name("lock name", part)
    return os.path.join(os.fspath(lock_dir), *parts[:-1], parts[-1] + ".lock")


class Lock:
    """An flock on ``<lock_dir>/<name>.lock``; see the module doc."""

    def __init__(
        self,
        name: str,
        lock_dir: str | os.PathLike[str],
        *,
        shared: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        shared_storage: bool = False,
    ) -> None:
        self.name = name
        self.path = lock_path(name, lock_dir)
        self.shared = shared
        self.timeout = timeout
        self.record = shared_storage
        self._key: tuple[str, int, int] | None = None

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        state = "held" if self.held else "free"
        return f"Lock({self.name!r}, {mode}, {state})"

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (LockTimeout)."""
        if self._key is not None:
            raise RuntimeError(f"lock {self.name} is already held by this Lock object")
        key = (self.path, os.getpid(), get_ident())
        holding = _held.get(key)
        if holding is not None:  # nested in this thread
            if holding.shared and not self.shared:
                raise LockUpgrade(self.name)
            holding.depth += 1
            self._key = key
            return
        fd = _open(self.path)
        try:
            _flock(fd, self.shared, self.timeout, self.name, self.record)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = _Holding(fd, self.shared, self.record)
        self._key = key

    def release(self) -> None:
        """Drop the lock (the outermost release of a nested lock unlocks)."""
        key = self._key
        if key is None:
            return
        self._key = None
        holding = _held[key]
        holding.depth -= 1
        if holding.depth == 0:
            del _held[key]
            try:
                if holding.record:
                    _record_lock(holding.fd, fcntl.F_UNLCK)
                else:
                    fcntl.flock(holding.fd, fcntl.LOCK_UN)
            finally:
                os.close(holding.fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _open(path: str) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return os.open(path, flags, 0o600)


def _record_lock(fd: int, kind: int) -> None:
    """An OFD record lock over the whole file (l_pid must be 0); EAGAIN or
    EACCES (BlockingIOError / PermissionError) when another holder conflicts."""
    # struct flock on LP64 Linux: short l_type, short l_whence, off_t l_start,
    # off_t l_len, pid_t l_pid (+ padding): 32 bytes
    arg = struct.pack("@hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)
    fcntl.fcntl(fd, F_OFD_SETLK, arg)


def _try(fd: int, shared: bool, record: bool) -> bool:
    try:
        if record:
            _record_lock(fd, fcntl.F_RDLCK if shared else fcntl.F_WRLCK)
        else:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:
        if e.errno == errno.ENOLCK:
            raise LockUnavailable(os.readlink(f"/proc/self/fd/{fd}")) from None
        raise
    return True


def flock_wait(fd: int, *, shared: bool, timeout: float, record: bool = False) -> bool:
    """flock ``fd`` (shared or exclusive), polling for at most ``timeout`` seconds;
    with ``record``, an fcntl OFD record lock instead (see the module doc).

    The project's one bounded lock wait (SR/VDI locks here, image locks in
    ``smcommon.vhd.locks``): True once held, False when the time is up.
    OSErrors other than "would block" propagate (ENOLCK as LockUnavailable).
    """
    deadline = time.monotonic() + timeout
    pause = FIRST_POLL
    while True:
        if _try(fd, shared, record):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, MAX_POLL)


def _flock(fd: int, shared: bool, timeout: float, name: str, record: bool = False) -> None:
    if not flock_wait(fd, shared=shared, timeout=timeout, record=record):
        raise LockTimeout(name, timeout)


def sr_lock(
    paths: Paths, sr: str, *, shared: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> Lock:
    """The lock of an SR's tree (VDI create/destroy/snapshot/clone, GC)."""
    return Lock(f"sr/{sr}", paths.lock_dir, shared=shared, timeout=timeout)


def vdi_lock(
    paths: Paths,
    sr: str,
    vdi: str,
    *,
    shared: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Lock:
    """The lock of one VDI's datapaths."""
    return Lock(f"vdi/{sr}/{vdi}", paths.lock_dir, shared=shared, timeout=timeout)
