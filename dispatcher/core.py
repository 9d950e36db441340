"""The dispatcher proper: routing one request body to plugin processes.

Owns ``Dispatcher.handle(route, body) -> (response body, log fields)``, which
never raises: every problem becomes a response.

- ``route`` is the SR type of ``POST /<type>``, or None for ``POST /``.
- ``/<type>``: any method goes to ``<plugins_dir>/<TYPE>SR`` (or
  ``<plugins_dir>/<type>/<TYPE>SR``); when SR.create or SR.attach succeeds the
  SR's type is learnt (``routes.RouteTable``), when SR.destroy succeeds it is
  forgotten.
- ``/``: routed by the call's ``sr`` to the type learnt for it; ``SR.ls``
  merges every plugin's answer (a plugin that fails is left out and logged;
  if every plugin fails the call fails with SR_LS_FAILED), ``Query.query`` lists every plugin's
  query_result, ``Query.diagnostics`` joins the dispatcher's and every
  plugin's text.
- Extra methods, on any path: ``Dispatcher.cancel({"dbg", "task"})`` and
  ``Dispatcher.status({"dbg"})`` (see ``dispatcher/__init__.py``).

A plugin's stdout is relayed byte for byte when it is a well-formed response
(a ``{"Status": ...}`` struct or a fault).  Otherwise the caller gets
``Backend_error`` with one of the codes below, the story in words, and the
tail of the plugin's stderr:

    PLUGIN_FAILED        exited non-zero            PLUGIN_KILLED   died by a signal
    PLUGIN_TIMEOUT       ran past the timeout       PLUGIN_BAD_RESPONSE  stdout is no response
    PLUGIN_OUTPUT_TOO_LARGE                          PLUGIN_START_FAILED  could not be executed
    UNKNOWN_SR_TYPE  UNKNOWN_SR  INVALID_REQUEST  DISPATCHER_BUSY  DISPATCHER_STOPPING

Concurrency: at most ``workers`` plugin processes at once; a call beyond that
waits up to ``queue_timeout`` for a slot, then gets DISPATCHER_BUSY.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smcommon.errors import InvalidRequest
from smcommon.paths import safe_name

from dispatcher import wire
from dispatcher.child import Child, ChildResult
from dispatcher.routes import RouteTable

log = logging.getLogger(__name__)

TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
LEARN_METHODS = ("SR.create", "SR.attach")
FANOUT_METHODS = ("SR.ls", "Query.query", "Query.diagnostics")


@dataclass
class Config:
    plugins_dir: Path
    timeout: float = 300.0
    workers: int = 16
    queue_timeout: float = 60.0
    max_body: int = 4 * 1024 * 1024
    max_response: int = 64 * 1024 * 1024
    cancel_grace: float = 5.0
    env: Mapping[str, str] | None = None
    import_dir: Path | None = None  # where PUT /data/... bodies are spooled
    max_import: int = 2040 << 30  # bytes; the VHD maximum


@dataclass
class CallRecord:
    id: int
    dbg: str
    method: str
    sr: str
    plugin: str
    started: float = field(default_factory=time.monotonic)
    children: list[Child] = field(default_factory=list)
    cancel_reason: str = ""  # "cancel" or "stop" once cancelled

    def as_struct(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dbg": self.dbg,
            "method": self.method,
            "sr": self.sr,
            "plugin": self.plugin,
            "pids": [c.pid for c in self.children if c.pid is not None],
            "seconds": round(time.monotonic() - self.started, 3),
            "cancelled": bool(self.cancel_reason),
        }


class Pool:
    """A bounded number of slots; waiters give up on timeout or cancellation."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.busy = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def acquire(self, timeout: float, cancelled: Callable[[], bool]) -> str:
        """``"ok"``, ``"timeout"`` or ``"cancelled"``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.waiting += 1
            try:
                while self.busy >= self.size:
                    if cancelled():
                        return "cancelled"
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return "timeout"
                    self._cond.wait(remaining)
                if cancelled():
                    return "cancelled"
                self.busy += 1
                return "ok"
            finally:
                self.waiting -= 1

    def release(self) -> None:
        with self._cond:
            self.busy -= 1
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _fail(*description: str) -> bytes:
    return wire.dumps_response(wire.failure(list(description)))


def _backend(code: str, *details: str) -> bytes:
    return _fail("Backend_error", code, *details)


class Dispatcher:
    def __init__(self, config: Config, routes: RouteTable) -> None:
        self.config = config
        self.routes = routes
        self.pool = Pool(config.workers)
        self.stopping = False
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[int, CallRecord] = {}
        self._idle = threading.Condition(self._lock)

    # -- plugins -----------------------------------------------------------------

    def plugin_path(self, sr_type: str) -> Path | None:
        name = sr_type.upper() + "SR"
        for path in (
            self.config.plugins_dir / name,
            self.config.plugins_dir / sr_type / name,
        ):
            if path.is_file() and os.access(path, os.X_OK):
                return path
        return None

    def plugin_types(self) -> list[str]:
        found = []
        try:
            entries = sorted(os.listdir(self.config.plugins_dir))
        except OSError:
            return []
        for entry in entries:
            if entry.endswith("SR") and entry[:-2].isupper():
                cand = entry[:-2].lower()
            elif TYPE_RE.fullmatch(entry):
                cand = entry
            else:
                continue
            if TYPE_RE.fullmatch(cand) and self.plugin_path(cand) and cand not in found:
                found.append(cand)
        return sorted(found)

    # -- the entry point -------------------------------------------------------

    def handle(self, route: str | None, body: bytes) -> tuple[bytes, dict[str, str]]:
        """The response body for one request body, and the fields of its log line."""
        fields = {
            "dbg": "-",
            "method": "-",
            "sr": "-",
            "plugin": route or "-",
            "outcome": "-",
        }
        try:
            call = wire.parse_call(body)
        except wire.WireError as e:
            fields["outcome"] = f"Fault:{e.fault_code}"
            return wire.dumps_fault(e.fault_code, str(e)), fields
        arg = call.arg
        dbg = arg.get("dbg")
        fields["dbg"] = dbg if isinstance(dbg, str) and dbg else "-"
        fields["method"] = call.method
        sr = arg.get("sr")
        fields["sr"] = sr if isinstance(sr, str) and sr else "-"
        if self.stopping:
            out = _backend(
                "DISPATCHER_STOPPING",
                "the dispatcher is stopping: resend the call when it is back",
            )
        elif call.method.startswith("Dispatcher."):
            fields["plugin"] = "dispatcher"
            out = self._internal(call)
        elif route is not None:
            out = self._to_type(call, route, body, fields)
        else:
            out = self._to_root(call, body, fields)
        if fields["outcome"] == "-":
            fields["outcome"] = _outcome(out)
        return out, fields

    def _to_type(
        self, call: wire.Call, sr_type: str, body: bytes, fields: dict[str, str]
    ) -> bytes:
        if not TYPE_RE.fullmatch(sr_type) or self.plugin_path(sr_type) is None:
            return _backend(
                "UNKNOWN_SR_TYPE",
                f"no plugin serves SR type {sr_type!r} in {self.config.plugins_dir}",
                "known types: " + (", ".join(self.plugin_types()) or "none"),
            )
        out, resp = self._call(call, sr_type, body, fields)
        if resp is not None:
            fields["outcome"] = resp.outcome
        sr = call.arg.get("sr")
        if resp is not None and resp.status == "Success" and isinstance(sr, str):
            if call.method in LEARN_METHODS and _safe(sr):
                self.routes.learn(sr, sr_type)
            elif call.method == "SR.destroy":
                self.routes.forget(sr)
        return out

    def _to_root(self, call: wire.Call, body: bytes, fields: dict[str, str]) -> bytes:
        if call.method in FANOUT_METHODS:
            fields["plugin"] = "*"
            return self._fanout(call, body)
        if len(call.params) != 1 or not isinstance(call.params[0], dict):
            return _backend(
                "INVALID_REQUEST", f"{call.method} takes one struct argument"
            )
        sr = call.arg.get("sr")
        if not isinstance(sr, str) or not sr:
            return _backend(
                "INVALID_REQUEST",
                f"{call.method} has no sr argument to route by: name the SR type "
                "(smctl --type TYPE; POST /<type>)",
            )
        sr_type = self.routes.get(sr)
        if sr_type is None:
            return _backend(
                "UNKNOWN_SR",
                f"SR {sr} is not attached on this host: attach it first "
                f"(smctl sr-attach {sr} --type TYPE --path DIR), or create one (smctl sr-create TYPE ...)",
            )
        fields["plugin"] = sr_type
        return self._to_type(call, sr_type, body, fields)

    # -- running plugins -----------------------------------------------------------

    def _call(
        self, call: wire.Call, sr_type: str, body: bytes, fields: dict[str, str]
    ) -> tuple[bytes, wire.Response | None]:
        """Run one plugin on ``body`` as a registered (cancellable) call."""
        rec = self._register(fields["dbg"], call.method, fields["sr"], sr_type)
        try:
            return self._run_one(rec, sr_type, body)
        finally:
            self._unregister(rec)

    def _run_one(
        self, rec: CallRecord, sr_type: str, body: bytes
    ) -> tuple[bytes, wire.Response | None]:
        path = self.plugin_path(sr_type)
        if path is None:
            return _backend(
                "UNKNOWN_SR_TYPE", f"no plugin serves SR type {sr_type!r}"
            ), None
        got = self.pool.acquire(
            self.config.queue_timeout, lambda: bool(rec.cancel_reason)
        )
        if got == "timeout":
            return _backend(
                "DISPATCHER_BUSY",
                f"all {self.pool.size} plugin slots stayed busy for {self.config.queue_timeout}s",
            ), None
        if got == "cancelled":
            return self._cancelled(rec), None
        try:
            child = Child(
                [str(path)],
                body,
                timeout=self.config.timeout,
                grace=self.config.cancel_grace,
                max_out=self.config.max_response,
                env=self.config.env,
            )
            with self._lock:
                rec.children.append(child)
                if rec.cancel_reason:
                    child.cancel()
            result = child.run()
        finally:
            self.pool.release()
        return self._judge(rec, path, result)

    def _judge(
        self, rec: CallRecord, path: Path, result: ChildResult
    ) -> tuple[bytes, wire.Response | None]:
        resp: wire.Response | None = None
        problem = ""
        if result.rc == 0 and not result.overflow:
            try:
                resp = wire.parse_response(result.out)
            except wire.WireError as e:
                problem = str(e)
            else:
                if resp.status not in ("Success", "Failure", "Fault"):
                    problem = "the response is not a {Status: Success|Failure} struct"
                    resp = None
        if resp is not None:
            return result.out, resp
        if result.cancelled:
            return self._cancelled(rec), None
        what = f"{path} ({rec.method})"
        tail = result.err_text() or "(no stderr)"
        if result.spawn_error:
            return _backend(
                "PLUGIN_START_FAILED", f"{what} {result.describe()}", tail
            ), None
        if result.timed_out:
            msg = f"{what} ran past the {self.config.timeout:g}s timeout; its process group was killed"
            return _backend("PLUGIN_TIMEOUT", msg, tail), None
        if result.overflow:
            msg = f"{what} wrote more than {self.config.max_response} bytes; it was killed"
            return _backend("PLUGIN_OUTPUT_TOO_LARGE", msg, tail), None
        if result.rc is not None and result.rc < 0:
            return _backend("PLUGIN_KILLED", f"{what} {result.describe()}", tail), None
        if result.rc:
            return _backend("PLUGIN_FAILED", f"{what} {result.describe()}", tail), None
        return _backend(
            "PLUGIN_BAD_RESPONSE", f"{what} printed no valid response: {problem}", tail
        ), None

    def _cancelled(self, rec: CallRecord) -> bytes:
        if rec.cancel_reason == "stop":
            return _backend(
                "DISPATCHER_STOPPING", f"{rec.method} was stopped with the dispatcher"
            )
        return _fail("Cancelled", rec.dbg)

    def _fanout(self, call: wire.Call, body: bytes) -> bytes:
        types = self.plugin_types()
        dbg = call.arg.get("dbg") if isinstance(call.arg.get("dbg"), str) else "-"
        results: dict[str, tuple[bytes, wire.Response | None]] = {}
        rec = self._register(str(dbg) or "-", call.method, "-", "*")

        def one(t: str) -> None:
            results[t] = self._run_one(rec, t, body)

        try:
            threads = [
                threading.Thread(target=one, args=(t,), daemon=True) for t in types[1:]
            ]
            for th in threads:
                th.start()
            if types:
                one(types[0])
            for th in threads:
                th.join()
        finally:
            self._unregister(rec)
        if rec.cancel_reason:
            return self._cancelled(rec)
        if call.method == "SR.ls":
            return self._merge_ls(types, results)
        if call.method == "Query.query":
            listing: list[dict[str, Any]] = []
            for t in types:
                out, resp = results[t]
                if (
                    resp is not None
                    and resp.status == "Success"
                    and isinstance(resp.value.get("Value"), dict)
                ):
                    listing.append(resp.value["Value"])
                elif resp is not None and resp.status == "Success":
                    listing.append(
                        {"driver": t, "error": "the answer is not a query_result"}
                    )
                else:
                    listing.append(
                        {"driver": t, "error": " ".join(_describe(out, resp))}
                    )
            return wire.dumps_response(wire.success(listing))
        texts = [self.diagnostics()]
        for t in types:
            out, resp = results[t]
            if resp is not None and resp.status == "Success":
                texts.append(f"== plugin {t} ==\n{resp.value.get('Value')}")
            else:
                texts.append(
                    f"== plugin {t} ==\nfailed: {' '.join(_describe(out, resp))}"
                )
        return wire.dumps_response(wire.success("\n".join(texts)))

    def _merge_ls(
        self, types: list[str], results: dict[str, tuple[bytes, wire.Response | None]]
    ) -> bytes:
        merged: list[str] = []
        failures: list[str] = []
        for t in types:
            out, resp = results[t]
            value = (
                resp.value.get("Value")
                if resp is not None and resp.status == "Success"
                else None
            )
            if isinstance(value, list):
                merged.extend(str(v) for v in value if str(v) not in merged)
            else:
                failures.append(f"{t}: {' '.join(_describe(out, resp))}")
        for f in failures:
            log.warning("SR.ls: plugin left out of the merged answer: %s", f)
        if failures and not merged and len(failures) == len(types):
            return _backend("SR_LS_FAILED", *failures)
        return wire.dumps_response(wire.success(merged))

    # -- the registry of running calls ------------------------------------------

    def _register(self, dbg: str, method: str, sr: str, plugin: str) -> CallRecord:
        with self._lock:
            rec = CallRecord(next(self._ids), dbg, method, sr, plugin)
            self._calls[rec.id] = rec
            return rec

    def _unregister(self, rec: CallRecord) -> None:
        with self._lock:
            self._calls.pop(rec.id, None)
            self._idle.notify_all()

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
            self.pool.wake()
        return len(recs)

    def cancel_all(self, reason: str = "stop") -> int:
        with self._lock:
            recs = [r for r in self._calls.values() if not r.cancel_reason]
            for rec in recs:
                rec.cancel_reason = reason
                for child in rec.children:
                    child.cancel()
        self.pool.wake()
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

    # -- Dispatcher.* --------------------------------------------------------------

    def _internal(self, call: wire.Call) -> bytes:
        arg = call.arg
        if call.method == "Dispatcher.cancel":
            task = arg.get("task")
            if not isinstance(task, str) or not task:
                return _backend(
                    "INVALID_REQUEST",
                    "Dispatcher.cancel needs task: the dbg of the call to cancel",
                )
            if self.cancel(task) == 0:
                return _fail("Does_not_exist", "task", task)
            return wire.dumps_response(wire.success(""))
        if call.method == "Dispatcher.status":
            return wire.dumps_response(wire.success(self.status()))
        return _fail("Unimplemented", call.method)

    def status(self) -> dict[str, Any]:
        return {
            "plugins_dir": str(self.config.plugins_dir),
            "plugins": self.plugin_types(),
            "workers": self.pool.size,
            "busy": self.pool.busy,
            "waiting": self.pool.waiting,
            "running": [r.as_struct() for r in self.running()],
            "srs": [
                {"sr": sr, "type": t} for sr, t in sorted(self.routes.srs().items())
            ],
            "stopping": self.stopping,
        }

    def diagnostics(self) -> str:
        st = self.status()
        lines = [
            "== dispatcher ==",
            f"plugins dir: {st['plugins_dir']} ({', '.join(st['plugins']) or 'no plugins'})",
            f"slots: {st['busy']}/{st['workers']} busy, {st['waiting']} waiting",
            f"known SRs: {len(st['srs'])}",
        ]
        lines += [f"  {s['sr']} ({s['type']})" for s in st["srs"]]
        lines += [
            f"running: {r['method']} dbg={r['dbg']} sr={r['sr']} {r['seconds']}s"
            for r in st["running"]
        ]
        return "\n".join(lines)


def _safe(sr: str) -> bool:
    try:
        safe_name("sr", sr)
    except InvalidRequest:
        return False
    return True


def _describe(out: bytes, resp: wire.Response | None) -> list[str]:
    if resp is not None and resp.fault is not None:
        return [f"fault {resp.fault[0]}: {resp.fault[1]}"]
    if resp is not None:
        return resp.error
    try:
        return wire.parse_response(out).error
    except wire.WireError:
        return ["(no response)"]


def _outcome(out: bytes) -> str:
    try:
        return wire.parse_response(out).outcome
    except wire.WireError:
        return "Invalid"
