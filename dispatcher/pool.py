"""The dispatcher's plugin slots, shared fairly between SRs.

Owns ``Pool``: at most ``size`` plugin processes at once, and at most
``share`` of them for one key (the call's SR; calls without an SR are keyed
by their plugin type).  A call beyond that waits in its key's queue, holding
no slot, until a slot is granted, its wait times out, or it is cancelled.
When a slot frees, it goes to the waiting call whose key runs the fewest calls
(the oldest first among equals), so a busy SR, whose calls may sit in a
plugin waiting up to ``SM_LOCK_TIMEOUT`` for the SR's lock, holds at most
``share`` slots and never starves the other SRs: they always find
``size - share`` slots (a quarter of the pool by default) it cannot take.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any


class _Waiter:
    __slots__ = ("granted", "key", "seq")

    def __init__(self, key: str, seq: int) -> None:
        self.key = key
        self.seq = seq
        self.granted = False


def default_share(size: int) -> int:
    """Slots one SR may hold: all but a quarter of the pool (at least one)."""
    return max(1, size - max(1, size // 4))


class Pool:
    """``size`` slots, at most ``share`` per key; see the module doc."""

    def __init__(self, size: int, share: int | None = None) -> None:
        self.size = max(1, size)
        self.share = max(1, min(self.size, share or default_share(self.size)))
        self.busy = 0
        self._running: dict[str, int] = {}
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiters)

    def acquire(
        self, key: str, timeout: float, cancelled: Callable[[], bool]
    ) -> str:
        """``"ok"`` (a slot is held for ``key``: release it), ``"timeout"`` or ``"cancelled"``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            w = _Waiter(key, next(self._seq))
            self._waiters.append(w)
            self._grant()
            while not w.granted:
                if cancelled():
                    self._waiters.remove(w)
                    return "cancelled"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._waiters.remove(w)
                    return "timeout"
                self._cond.wait(remaining)
            if cancelled():
                self._release(key)
                return "cancelled"
            return "ok"

    def release(self, key: str) -> None:
        with self._cond:
            self._release(key)

    def _release(self, key: str) -> None:
        self.busy -= 1
        left = self._running.get(key, 1) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the waiters that may take them, fairest first."""
        granted = False
        while self.busy < self.size and self._waiters:
            best: _Waiter | None = None
            best_rank: tuple[int, int] | None = None
            for w in self._waiters:
                running = self._running.get(w.key, 0)
                if running >= self.share:
                    continue
                rank = (running, w.seq)
                if best_rank is None or rank < best_rank:
                    best, best_rank = w, rank
            if best is None:
                break
            self._waiters.remove(best)
            best.granted = True
            self.busy += 1
            self._running[best.key] = self._running.get(best.key, 0) + 1
            granted = True
        if granted:
            self._cond.notify_all()

    def wake(self) -> None:
        """Let waiters look at their cancellation now."""
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """Slots in use and queues, per key."""
        with self._cond:
            queued: dict[str, int] = {}
            for w in self._waiters:
                queued[w.key] = queued.get(w.key, 0) + 1
            keys = sorted(set(self._running) | set(queued))
            return {
                "workers": self.size,
                "share": self.share,
                "busy": self.busy,
                "waiting": len(self._waiters),
                "queues": [
                    {
                        "key": k,
                        "running": self._running.get(k, 0),
                        "waiting": queued.get(k, 0),
                    }
                    for k in keys
                ],
            }
