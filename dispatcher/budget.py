"""How long one plugin call may run: a class per method, long work sized by its disk.

Owns ``Limits`` (the dispatcher's settings) and ``Budget`` (one call's
deadline, asked again each time it passes).  Three classes of method:

- short: ``Query.*``, ``SR.ls``, ``SR.stat``, ``SR.scan``, ``VDI.stat``,
  ``VDI.get_by_name``, ``VDI.get_url``, ``VDI.similar_content``: they read
  metadata only; ``min(short, timeout)`` seconds.
- long: ``VDI.copy``, ``VDI.import_raw``, ``VDI.export``, and the calls that
  may coalesce a chain inside them (``VDI.destroy``, ``VDI.compose``,
  ``VDI.set_persistent``, ``SR.gc``): their work grows with the disk.  They
  get ``timeout + size / min_rate`` seconds, where ``size`` is the total the
  plugin reports in its progress file (``smcommon.progress``) once it has, and
  the VHD maximum (2040 GiB) before.  The default ``min_rate`` (50 MB/s) is a
  sixteenth of this machine's disk (about 800 MB/s read cold, 1 GB/s written
  with fsync, measured with dd), so a 2 TiB copy may take 12 hours and a
  10 GiB one about 9 minutes on top of ``timeout``.  A long call whose progress
  stands still (``0 < done < total`` unchanged) for ``stall`` seconds is
  killed before that.
- normal: everything else (create, snapshot, attach ...): ``timeout`` seconds.

The deadline is checked when it passes, and at least every ``CHECK_EVERY``
seconds for long calls (to read their progress); ``why`` says what ended a
call that ran out.
"""

from __future__ import annotations

from pathlib import Path

from smcommon import progress
from smcommon.record import record

MAX_DISK = 2040 << 30  # the VHD maximum virtual size
CHECK_EVERY = 10.0  # seconds between two looks at a long call's progress

SHORT_METHODS = frozenset(
    {
        "Query.query",
        "Query.diagnostics",
        "SR.ls",
        "SR.stat",
        "SR.scan",
        "SR.probe",
        "VDI.stat",
        "VDI.get_by_name",
        "VDI.get_url",
        "VDI.similar_content",
    }
)
LONG_METHODS = frozenset(
    {
        "VDI.copy",
        "VDI.import_raw",
        "VDI.export",
        "VDI.destroy",
        "VDI.compose",
        "VDI.set_persistent",
        "SR.gc",
    }
)


@record(frozen=True)
class Limits:
    timeout: float = 300.0  # normal methods
    short: float = 60.0  # short methods (never more than ``timeout``)
    min_rate: float = 50e6  # bytes/s a long call is granted per byte of its disk
    stall: float = 600.0  # seconds a long call's progress may stand still

    def kind(self, method: str) -> str:
        if method in SHORT_METHODS:
            return "short"
        if method in LONG_METHODS:
            return "long"
        return "normal"

    def budget(self, method: str, progress_file: Path | None = None) -> Budget:
        return Budget(self, self.kind(method), progress_file)


class Budget:
    """One call's time: ``first(started)``, then ``check(now)`` at each deadline."""

    def __init__(self, limits: Limits, kind: str, progress_file: Path | None) -> None:
        self.limits = limits
        self.kind = kind
        self.progress_file = progress_file
        self.started = 0.0
        self.size = MAX_DISK
        self.why = ""
        self._done = -1
        self._moved = 0.0

    def allowed(self) -> float:
        """Seconds the call may run in all, as known now."""
        lim = self.limits
        if self.kind == "short":
            return min(lim.short, lim.timeout)
        if self.kind == "long":
            return lim.timeout + self.size / lim.min_rate
        return lim.timeout

    def first(self, started: float) -> float:
        """The first deadline (monotonic seconds) of a call started at ``started``."""
        self.started = self._moved = started
        return self._next(started)

    def _next(self, now: float) -> float:
        end = self.started + self.allowed()
        if self.kind == "long":
            return min(end, now + CHECK_EVERY)
        return end

    def check(self, now: float) -> float | None:
        """The next deadline, or None: the call must end now (``why`` says why)."""
        if self.kind == "long" and self.progress_file is not None:
            p = progress.read(self.progress_file)
            if p is not None:
                if p["total"] > 0:
                    self.size = min(p["total"], MAX_DISK)
                if p["done"] != self._done:
                    self._done, self._moved = p["done"], now
                elif 0 < p["done"] < p["total"] and now - self._moved >= self.limits.stall:
                    self.why = (
                        f"made no progress for {self.limits.stall:g}s "
                        f"({p['done']} of {p['total']} bytes done)"
                    )
                    return None
        if now >= self.started + self.allowed():
            self.why = f"ran past the {self.allowed():g}s timeout"
            if self.kind == "long":
                self.why += f" ({self.limits.timeout:g}s + {self.size} bytes at {self.limits.min_rate:g} B/s)"
            return None
        return self._next(now)
