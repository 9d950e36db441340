"""smctl's progress bar: a long call's progress, drawn on a terminal while it runs.

Owns ``ProgressBar``: a thread that asks ``Dispatcher.status`` (through a
second connection, or the in-process dispatcher of ``--direct``) every
``PERIOD`` seconds for the running call with our dbg and draws one line on
stderr::

    copy  [###########.........]  55%  1.1G/2G  312M/s  eta 3s

It draws only on a terminal: ``smctl`` starts it for the long commands
(``LONG_COMMANDS``) when stderr is a tty and ``--json`` is not given, so
scripts see nothing extra.  The line is erased when the call ends.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import Any, Self, TextIO

from dispatcher.smctl_show import human_size

PERIOD = 0.25  # seconds between two looks (less if $SM_PROGRESS_INTERVAL is less)
LONG_COMMANDS = frozenset(
    {"vdi-copy", "vdi-destroy", "vdi-compose", "vdi-set-persistent", "gc", "sr-destroy"}
)


def render(p: dict[str, Any], width: int) -> str:
    """One line for a progress dict (``smcommon.progress.read``), at most ``width`` wide."""
    done, total = int(p.get("done", 0)), int(p.get("total", 0))
    what = str(p.get("what", ""))[:10]
    parts = []
    if total > 0:
        parts.append(f"{min(100.0, 100.0 * done / total):3.0f}%")
        parts.append(f"{human_size(done)}/{human_size(total)}")
    else:
        parts.append(human_size(done))
    rate = float(p.get("rate") or 0)
    if rate > 0:
        parts.append(f"{human_size(int(rate))}/s")
    if p.get("eta") is not None:
        parts.append(f"eta {_duration(float(p['eta']))}")
    tail = "  ".join(parts)
    room = width - len(what) - len(tail) - 6
    if total > 0 and room >= 10:
        room = min(room, 40)
        filled = int(room * min(done, total) / total)
        bar = f"[{'#' * filled}{'.' * (room - filled)}]"
        line = f"{what}  {bar}  {tail}"
    else:
        line = f"{what}  {tail}"
    return line[: max(0, width - 1)]


def _duration(s: float) -> str:
    s = int(s + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBar:
    """Polls ``status()`` for the running call whose dbg is ``dbg``; see the module doc."""

    def __init__(
        self, dbg: str, status: Callable[[], dict[str, Any]], stream: TextIO
    ) -> None:
        self.dbg = dbg
        self.status = status
        self.stream = stream
        self._stop = threading.Event()
        self._drawn = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._drawn:
            self._write("\r\x1b[K")

    def _run(self) -> None:
        try:
            period = min(PERIOD, float(os.environ.get("SM_PROGRESS_INTERVAL") or PERIOD))
        except ValueError:
            period = PERIOD
        while not self._stop.wait(period):
            try:
                st = self.status()
            except Exception:  # noqa: BLE001 -- the bar is a courtesy: never fail the call
                st = {}
            found: list[dict[str, Any]] = [
                r["progress"]
                for r in st.get("running", [])
                if isinstance(r, dict)
                and r.get("dbg") == self.dbg
                and isinstance(r.get("progress"), dict)
            ]
            if found and not self._stop.is_set():
                width = shutil.get_terminal_size((80, 24)).columns
                self._write("\r" + render(found[-1], width) + "\x1b[K")
                self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass
