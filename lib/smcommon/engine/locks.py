"""The engine's use of ``smcommon.lock``: one lock per SR, one per VDI.

The SR lock covers changes to an SR's tree and VDI records; a VDI lock covers
that VDI's datapath changes.  Order: the SR lock first, then VDI locks.
Waits are bounded (``$SM_LOCK_TIMEOUT`` seconds, default 30): a lock not
taken in time raises ``LockTimeout`` (``Backend_error LOCK_TIMEOUT``).
"""

from __future__ import annotations

import os

from smcommon import lock
from smcommon.paths import Paths

ENV_TIMEOUT = "SM_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 30.0


def default_timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def sr_lock(paths: Paths, sr: str, timeout: float | None = None) -> lock.Lock:
    t = default_timeout() if timeout is None else timeout
    return lock.sr_lock(paths, sr, timeout=t)


def vdi_lock(
    paths: Paths, sr: str, vdi: str, timeout: float | None = None
) -> lock.Lock:
    t = default_timeout() if timeout is None else timeout
    return lock.vdi_lock(paths, sr, vdi, timeout=t)
