"""Outcomes kept until their caller has them: a retry after a lost reply gets the first one.

When the dispatcher is killed, the plugins it started finish their calls (they
are process groups of their own) but their callers get no answer; a caller
that sends the same call again must get the first call's outcome, not a
second VDI.  Owns ``OutcomeStore``, one directory
(``<state_dir>/dispatcher/outcomes``) holding, per call that changes something
(every method but the read-only ones, ``READ_ONLY``)::

    <key>.<instance>.<id>.json  the call: dbg, method, sr, started, the plugin's
                                pid and start time (/proc/<pid>/stat), written
                                by the dispatcher once the plugin runs
    <key>.<instance>.<id>.xml   its response, written by the plugin itself
                                (``smcommon.plugin``, ``$SM_OUTCOME_FILE``)
                                before it answers on stdout, or by the
                                dispatcher when the answer could not be sent

``key`` is a hash of (dbg, method, parameters): a retry is the same call
with the same dbg.  Both files go when the response has been written to the
caller's connection (``settle``).  What stays is *unclaimed*: the reply was
lost (dispatcher killed, caller gone).  A new call with the same key:

- finds an unclaimed ``.xml`` (any instance): gets that response, and the
  record goes once it has been delivered;
- finds a ``.json`` of an earlier dispatcher instance whose plugin still runs
  (same pid and start time): waits (holding no slot) for its ``.xml``, then
  as above;
- otherwise runs.  Calls of this instance still running are independent
  calls that happen to look alike: a retry of one of them runs again.

Retention is bounded: records older than ``ttl`` and beyond the newest
``max_records`` are removed (at start and every ``PRUNE_EVERY`` records), as
are records of plugins that died without an answer.  No fsync: these records
cover a dispatcher killed, not the host crashing.  A dispatcher killed between
writing a reply and removing its record leaves it unclaimed: an identical call
(same dbg, method and arguments) within ``ttl`` gets that answer again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smcommon.record import record

from dispatcher import wire

log = logging.getLogger(__name__)

ENV = "SM_OUTCOME_FILE"
READ_ONLY = frozenset(
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
PRUNE_EVERY = 64
POLL = 0.05


def proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may hold anything: split after it
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        if fields[0] == b"Z":
            return None  # exited, not yet reaped
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@record
class Entry:
    """The record of one call (see the module doc)."""

    base: Path  # <dir>/<key>.<instance>.<id>

    @property
    def meta(self) -> Path:
        return self.base.with_name(self.base.name + ".json")

    @property
    def outcome(self) -> Path:
        return self.base.with_name(self.base.name + ".xml")


class OutcomeStore:
    def __init__(
        self,
        directory: Path,
        instance: str,
        *,
        ttl: float = 24 * 3600.0,
        max_records: int = 1000,
    ) -> None:
        self.dir = directory
        self.instance = instance
        self.ttl = ttl
        self.max_records = max_records
        self._count = 0
        self._active: set[str] = set()  # records of calls this instance still handles
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def recorded(method: str) -> bool:
        return method not in READ_ONLY and not method.startswith("Dispatcher.")

    @staticmethod
    def key(dbg: str, method: str, params: Any) -> str:
        canon = json.dumps(
            [dbg, method, params], sort_keys=True, default=repr, separators=(",", ":")
        )
        return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    # -- one call ---------------------------------------------------------------------

    def entry(self, key: str, call_id: int) -> Entry:
        with self._lock:
            self._count += 1
            prune = self._count % PRUNE_EVERY == 0
            entry = Entry(self.dir / f"{key}.{self.instance}.{call_id}")
            self._active.add(entry.base.name)
        if prune:
            self.prune()
        return entry

    def _busy(self, entry: Entry) -> bool:
        with self._lock:
            return entry.base.name in self._active

    def started(self, entry: Entry, pid: int, dbg: str, method: str, sr: str) -> None:
        """Note that ``pid`` runs the call (so a later instance can wait for it)."""
        doc = {
            "dbg": dbg,
            "method": method,
            "sr": sr,
            "started": round(time.time(), 3),
            "pid": pid,
            "pid_start": proc_start(pid),
            "instance": self.instance,
        }
        with contextlib.suppress(OSError):
            entry.meta.write_bytes(json.dumps(doc).encode())

    def settle(self, entry: Entry, delivered: bool, out: bytes) -> None:
        """The reply was written to the caller (records go) or not (kept, unclaimed)."""
        with self._lock:
            self._active.discard(entry.base.name)
        if delivered:
            for p in (entry.outcome, entry.meta):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            return
        if not entry.outcome.exists():
            write_outcome(entry.outcome, out)
        if not entry.meta.exists():
            doc = {"instance": self.instance, "started": round(time.time(), 3)}
            with contextlib.suppress(OSError):
                entry.meta.write_bytes(json.dumps(doc).encode())
        log.warning("reply not delivered: kept as unclaimed %s", entry.base.name)

    # -- retries -------------------------------------------------------------------------

    def previous(
        self, key: str, wait: float, cancelled: Callable[[], bool]
    ) -> tuple[Entry, bytes] | None:
        """The first outcome of a call with ``key`` whose reply was lost (see module doc)."""
        deadline = time.monotonic() + wait
        while True:
            running = False
            for meta_or_out in sorted(self.dir.glob(f"{key}.*")):
                name = meta_or_out.name
                stem, _, ext = name.rpartition(".")
                entry = Entry(self.dir / stem)
                if self._busy(entry):
                    continue  # a call this instance still handles: not a lost reply
                if ext == "xml":
                    try:
                        return entry, entry.outcome.read_bytes()
                    except FileNotFoundError:
                        continue  # delivered meanwhile
                if ext != "json" or entry.outcome.exists():
                    continue
                doc = _read_json(entry.meta)
                if doc is None or doc.get("instance") == self.instance:
                    continue
                if _alive(doc):
                    running = True
                else:
                    _remove(entry)  # its plugin died without an answer
            if not running or cancelled() or time.monotonic() >= deadline:
                return None
            time.sleep(POLL)

    # -- listing and retention ---------------------------------------------------------

    def unclaimed(self) -> list[dict[str, Any]]:
        """Outcomes nobody received yet, oldest first: what the call was, and how it ended."""
        found: list[dict[str, Any]] = []
        for out in self.dir.glob("*.xml"):
            entry = Entry(out.with_suffix(""))
            if self._busy(entry):
                continue
            doc = _read_json(entry.meta) or {}
            try:
                st = out.stat()
                outcome = wire.parse_response(out.read_bytes()).outcome
            except OSError:
                continue
            except wire.WireError:
                outcome = "Invalid"
            found.append(
                {
                    "record": entry.base.name,
                    "dbg": str(doc.get("dbg", "")),
                    "method": str(doc.get("method", "")),
                    "sr": str(doc.get("sr", "")),
                    "finished": round(st.st_mtime, 3),
                    "outcome": outcome,
                }
            )
        found.sort(key=lambda d: d["finished"])
        return found

    def prune(self) -> int:
        """Remove expired and excess records, and those of plugins that died unanswered."""
        removed = 0
        now = time.time()
        done: list[tuple[float, Entry]] = []
        try:
            names = os.listdir(self.dir)
        except OSError:
            return 0
        for name in names:
            path = self.dir / name
            if name.endswith(".tmp"):
                if _age(path, now) > 3600:
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            stem, _, ext = name.rpartition(".")
            entry = Entry(self.dir / stem)
            if self._busy(entry):
                continue
            if ext == "xml":
                age = _age(path, now)
                if age > self.ttl:
                    removed += _remove(entry)
                else:
                    done.append((now - age, entry))
            elif ext == "json" and not entry.outcome.exists():
                doc = _read_json(entry.meta)
                dead = doc is None or (
                    doc.get("instance") != self.instance and not _alive(doc)
                )
                if dead and _age(path, now) > 5:  # not one being written right now
                    removed += _remove(entry)
        done.sort(key=lambda t: t[0])
        for _t, entry in done[: max(0, len(done) - self.max_records)]:
            removed += _remove(entry)
        return removed


def write_outcome(path: Path | str, data: bytes) -> None:
    """Write a response record (temp + rename: a reader sees all of it or nothing)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot keep the outcome %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _alive(doc: dict[str, Any]) -> bool:
    pid, start = doc.get("pid"), doc.get("pid_start")
    if not isinstance(pid, int) or start is None:
        return False
    return proc_start(pid) == start


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(entry: Entry) -> int:
    n = 0
    for p in (entry.outcome, entry.meta):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n = 1
    return n
