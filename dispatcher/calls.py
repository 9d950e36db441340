"""The registry of running calls: what ``Dispatcher.status`` lists and ``Dispatcher.cancel`` finds.

Owns ``CallRecord`` (one call: its dbg, method, SR, plugin processes, state,
budget and progress file) and ``CallTable`` (register, cancel by dbg, wait
until idle).  Cancelling marks the record (a call still queued gives up) and
signals its plugin processes (``Child.cancel``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smcommon import progress
from smcommon.record import field, record

from dispatcher.budget import Budget
from dispatcher.child import Child


@record
class CallRecord:
    id: int
    dbg: str
    method: str
    sr: str
    plugin: str
    started: float = field(default_factory=time.monotonic)
    children: list[Child] = field(default_factory=list)
    cancel_reason: str = ""  # "cancel" or "stop" once cancelled
    state: str = "queued"  # queued, running, waiting-for-first-run, receiving
    progress_file: Path | None = None
    budget: Budget | None = None

    def as_struct(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "dbg": self.dbg,
            "method": self.method,
            "sr": self.sr,
            "plugin": self.plugin,
            "pids": [c.shown_pid for c in self.children if c.shown_pid is not None],
            "seconds": round(time.monotonic() - self.started, 3),
            "cancelled": bool(self.cancel_reason),
            "state": self.state,
        }
        if self.budget is not None and self.state == "running":
            out["timeout"] = round(self.budget.allowed(), 1)
        if self.progress_file is not None:
            p = progress.read(self.progress_file)
            if p is not None:
                out["progress"] = p
        return out


class CallTable:
    """The running calls; ``wake`` lets queued calls see a cancellation."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[int, CallRecord] = {}
        self._idle = threading.Condition(self._lock)

    def register(self, dbg: str, method: str, sr: str, plugin: str) -> CallRecord:
        with self._lock:
            rec = CallRecord(next(self._ids), dbg, method, sr, plugin)
            self._calls[rec.id] = rec
            return rec

    def unregister(self, rec: CallRecord) -> None:
        with self._lock:
            self._calls.pop(rec.id, None)
            self._idle.notify_all()
        if rec.progress_file is not None:
            try:
                rec.progress_file.unlink()
            except FileNotFoundError:
                pass

    def adopt(self, rec: CallRecord, child: Child) -> None:
        """``child`` runs for ``rec`` (cancelled at once if ``rec`` already is)."""
        with self._lock:
            rec.children.append(child)
            if rec.cancel_reason:
                child.cancel()

    def running(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls.values())

    def cancel(self, task: str, reason: str = "cancel") -> int:
        """Cancel every running call whose dbg is ``task``; how many there were."""
        with self._lock:
            recs = [
                r for r in self._calls.values() if r.dbg == task and not r.cancel_reason
            ]
            for rec in recs:
                rec.cancel_reason = reason
                for child in rec.children:
                    child.cancel()
        if recs:
            self._wake()
        return len(recs)

    def cancel_all(self, reason: str = "stop") -> int:
        with self._lock:
            recs = [r for r in self._calls.values() if not r.cancel_reason]
            for rec in recs:
                rec.cancel_reason = reason
                for child in rec.children:
                    child.cancel()
        self._wake()
        return len(recs)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is running; False if some still run after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._calls:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True
