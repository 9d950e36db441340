"""Progress of long work (copy, import, export, coalesce) for whoever watches.

Owns the per-call progress file: a small JSON document that the process doing
the work replaces atomically (temp file + rename, no fsync: it lives under the
run directory and means nothing after a reboot) at most every ``INTERVAL``
seconds, and that the dispatcher reads for ``Dispatcher.status``::

    {"what": "copy", "done": 1073741824, "total": 4294967296,
     "rate": 312000000.0, "started": 1700000000.1, "updated": 1700000003.6,
     "pid": 4242}

``rate`` is bytes per second over the last few seconds (the whole run at the
start).  The file is named by whoever starts the call: the dispatcher sets
``SM_PROGRESS_FILE`` in each plugin's environment (one file per call, keyed by
the call's id, under ``<run_dir>/progress``).  Without that variable (a plugin
run by hand, the ``vhd`` command) a tracker costs one attribute check per
update and writes nothing.

Library code reports with a tracker::

    with progress.track("copy", total) as t:
        for ...:
            ...
            t.add(len(chunk))

Trackers nest (a copy that imports): the innermost running one is what the
file shows; when it ends the outer one shows again on its next update.  A
tracker may also be given its own file (the dispatcher's uploads, one per
thread): trackers of different files do not interfere.
"""

from __future__ import annotations

import json
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Self

ENV = "SM_PROGRESS_FILE"
INTERVAL = 0.5  # seconds between two writes of the file
INTERVAL_ENV = "SM_PROGRESS_INTERVAL"  # another INTERVAL (tests: finer updates)
WINDOW = 10  # samples (one per write) the rate is measured over

_sink: str | None = None
_sink_known = False
_stack: list[Tracker] = []


def sink() -> str | None:
    """The progress file of this process (``$SM_PROGRESS_FILE``), or None."""
    global _sink, _sink_known, INTERVAL
    if not _sink_known:
        _sink = os.environ.get(ENV) or None
        _sink_known = True
        try:
            INTERVAL = float(os.environ.get(INTERVAL_ENV) or INTERVAL)
        except ValueError:
            pass
    return _sink


def set_sink(path: str | os.PathLike[str] | None) -> None:
    """Send this process's progress to ``path`` (None: nowhere); for forked children and tests."""
    global _sink, _sink_known
    _sink = os.fspath(path) if path is not None else None
    _sink_known = True
    _stack.clear()


class Tracker:
    """Bytes done of ``total`` for one step of work; see the module doc."""

    __slots__ = ("_next", "_samples", "done", "path", "started", "total", "what")

    def __init__(self, what: str, total: int, path: str | None) -> None:
        self.what = what
        self.total = max(0, int(total))
        self.done = 0
        self.path = path
        self.started = time.time()
        self._next = 0.0
        self._samples: list[tuple[float, int]] = []

    def add(self, n: int) -> None:
        self.done += n
        if self.path is not None and time.monotonic() >= self._next:
            self._write()

    def set(self, done: int) -> None:
        self.done = done
        if self.path is not None and time.monotonic() >= self._next:
            self._write()

    def rate(self, now: float) -> float:
        """Bytes per second over the recent samples (the whole run before there are any)."""
        if self._samples:
            t0, d0 = self._samples[0]
            if now - t0 > 0.05:
                return (self.done - d0) / (now - t0)
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0.05 else 0.0

    def state(self) -> dict[str, Any]:
        now = time.time()
        return {
            "what": self.what,
            "done": self.done,
            "total": self.total,
            "rate": round(self.rate(now), 1),
            "started": round(self.started, 3),
            "updated": round(now, 3),
            "pid": os.getpid(),
        }

    def _write(self) -> None:
        self._next = time.monotonic() + INTERVAL
        top = _stack[-1] if _stack else self
        if top is not self and top.path == self.path:
            return  # an inner step is what the file shows
        doc = self.state()
        self._samples.append((doc["updated"], self.done))
        del self._samples[:-WINDOW]
        assert self.path is not None
        write(self.path, doc)

    def __enter__(self) -> Self:
        _stack.append(self)
        if self.path is not None:
            self._write()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.path is not None and exc_type is None:
            self.done = max(self.done, self.total)  # the step is complete
            self._next = 0.0
            self._write()
        if self in _stack:
            _stack.remove(self)
        for outer in _stack:
            if outer.path == self.path:
                outer._next = 0.0  # the outer step shows again on its next update


def track(what: str, total: int) -> Tracker:
    """A tracker writing to this process's progress file (or nowhere)."""
    return Tracker(what, total, sink())


def write(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Replace the progress file ``path`` by ``doc`` (readers never see half a file)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(doc).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        pass  # progress is advisory: never fail the work over it


def read(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last progress written to ``path``; None if there is none (or it is unreadable)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    try:
        done, total = int(doc["done"]), int(doc["total"])
        rate = float(doc.get("rate") or 0.0)
    except (KeyError, TypeError, ValueError):
        return None
    out: dict[str, Any] = {
        "what": str(doc.get("what", "")),
        "done": done,
        "total": total,
        "rate": rate,
        "updated": float(doc.get("updated") or 0.0),
    }
    if total > 0:
        out["percent"] = round(min(100.0, 100.0 * done / total), 1)
    if rate > 0 and total > done:
        out["eta"] = round((total - done) / rate, 1)
    return out
