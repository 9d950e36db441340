"""Where the engine's locks live: on this host, or in the SR.

Two kinds of state, two places (see docs/design.md, "Locks"):

- What several hosts attaching the same SR must agree on (the VDI records,
  the tree of volumes, the collector's journal) is locked *in the SR*: lock
  files under ``<sr dir>/.sm/locks/``, taken as fcntl record locks
  (``smcommon.lock``, ``shared_storage=True``), which an NFS mount carries to
  the server.  ``tree_lock(dir)`` covers changes to the SR's tree and VDI
  records, and the collector (so one host collects at a time);
  ``vdi_lock(dir, vdi)`` covers one VDI's datapath changes and the tree
  changes that must not interleave with them.  The directory is the volume
  store's (``VolumeStore.shared_lock_dir()``): a store keeping its volumes
  somewhere else (logical volumes) names a shared place of its own.
- What only this host knows (which SRs it attached, its mounts, its
  datapath states) is locked on the host: ``host_sr_lock(paths, sr)``, under
  ``Paths.lock_dir``, around SR.create/attach/detach/destroy/reset.

Order: the host lock first, then the tree lock, then VDI locks.  Waits are
bounded (``$SM_LOCK_TIMEOUT`` seconds, default 30): a lock not taken in time
raises ``LockTimeout`` (``Backend_error LOCK_TIMEOUT``).  A holder that dies
releases its locks (the kernel, or for NFS the server: at once for a killed
process, at lease expiry (NFSv4) or lock recovery (NFSv3, NSM) for a host
that died).
"""

from __future__ import annotations

import os
from pathlib import Path

from smcommon import lock
from smcommon.errors import BackendError
from smcommon.paths import Paths

ENV_TIMEOUT = "SM_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
SM_DIR = ".sm"  # the SR's own metadata directory (smcommon.engine.meta)
LOCK_SUBDIR = "locks"


def default_timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def _t(timeout: float | None) -> float:
    return default_timeout() if timeout is None else timeout


def host_sr_lock(paths: Paths, sr: str, timeout: float | None = None) -> lock.Lock:
    """This host's lock of an SR: its mount, registry entry and datapaths."""
    return lock.sr_lock(paths, sr, timeout=_t(timeout))


def shared_lock_dir(sr_dir: Path) -> Path:
    """Where the SR's shared lock files are; BackendError if the SR's metadata
    directory is not there (never created, destroyed, or not mounted): lock
    files are never created in an empty mount point."""
    sm = Path(sr_dir) / SM_DIR
    if not sm.is_dir():
        raise BackendError(
            "SR_DIR_MISSING", [f"{sr_dir} holds no SR metadata ({SM_DIR}): not mounted?"]
        )
    return sm / LOCK_SUBDIR


def tree_lock(lock_dir: Path, timeout: float | None = None) -> lock.Lock:
    """The SR's tree lock in ``lock_dir``, the SR's shared lock directory
    (``VolumeStore.shared_lock_dir()``; for file SRs ``shared_lock_dir(sr_dir)``)."""
    return lock.Lock("tree", lock_dir, timeout=_t(timeout), shared_storage=True)


def vdi_lock(lock_dir: Path, vdi: str, timeout: float | None = None) -> lock.Lock:
    """One VDI's lock in the SR's shared lock directory."""
    return lock.Lock(f"vdi/{vdi}", lock_dir, timeout=_t(timeout), shared_storage=True)
