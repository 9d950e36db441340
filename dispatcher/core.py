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

Concurrency: at most ``workers`` plugin processes at once, and at most
``share`` of them for one SR (``dispatcher.pool``); a call beyond that waits,
holding no slot, up to ``queue_timeout``, then gets DISPATCHER_BUSY.  How long
a plugin may run depends on its method (``dispatcher.budget``).

Each plugin gets in its environment ``SM_PROGRESS_FILE`` (its progress,
``smcommon.progress``, shown by ``Dispatcher.status``) and, for calls that
change something and arrive through ``serve`` (the HTTP layer),
``SM_OUTCOME_FILE`` (``dispatcher.outcomes``: a retry after a lost reply gets
the first outcome).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from smcommon import progress
from smcommon.errors import InvalidRequest
from smcommon.paths import safe_name
from smcommon.record import field, record

from dispatcher import fanout, wire
from dispatcher.budget import Limits
from dispatcher.calls import CallRecord, CallTable
from dispatcher.child import Child, ChildResult
from dispatcher.grants import Grants
from dispatcher.outcomes import ENV as OUTCOME_ENV
from dispatcher.outcomes import Entry, OutcomeStore
from dispatcher.pool import Pool
from dispatcher.replies import Judge
from dispatcher.replies import backend as _backend
from dispatcher.replies import fail as _fail
from dispatcher.replies import outcome as _outcome
from dispatcher.replies import parse_or_none as _parse_or_none
from dispatcher.routes import RouteTable
from dispatcher.warm import WarmPool, interpreter

log = logging.getLogger(__name__)

TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
LEARN_METHODS = ("SR.create", "SR.attach")
FANOUT_METHODS = ("SR.ls", "Query.query", "Query.diagnostics")


@record
class Config:
    plugins_dir: Path
    timeout: float = 300.0  # normal methods; see dispatcher.budget for the others
    workers: int = 16
    queue_timeout: float = 60.0
    max_body: int = 4 * 1024 * 1024
    max_response: int = 64 * 1024 * 1024
    cancel_grace: float = 5.0
    env: Mapping[str, str] | None = None
    import_dir: Path | None = None  # where PUT /data/... bodies are spooled
    max_import: int = 2040 << 30  # bytes; the VHD maximum
    share: int | None = None  # slots one SR may hold (default: dispatcher.pool)
    short_timeout: float = 60.0
    min_rate: float = 50e6  # bytes/s: long calls' time grows with their disk
    stall_timeout: float = 600.0
    progress_dir: Path | None = None  # per-call progress files
    max_spool: int = 4 << 40  # bytes spooled by uploads at once (on disk)
    spool_reserve: int = 1 << 30  # bytes left free on the spool's filesystem
    warm: bool = False  # fork calls from warm parents (dispatcher.warm)
    warm_max_calls: int = 1000
    warm_max_growth: int = 64 << 20

    @property
    def limits(self) -> Limits:
        return Limits(
            timeout=self.timeout,
            short=self.short_timeout,
            min_rate=self.min_rate,
            stall=self.stall_timeout,
        )


class NoSlot(Exception):
    """Work done in the dispatcher itself found no slot (its message says why)."""


@record
class Served:
    """One answered request, for the HTTP layer to ``settle`` once it has written it."""

    out: bytes
    fields: dict[str, str]
    entries: list[Entry] = field(default_factory=list)
    client: str = ""  # who called: a certificate name, unix:<uid>, insecure:<address>


class Dispatcher:
    def __init__(
        self,
        config: Config,
        routes: RouteTable,
        outcomes: OutcomeStore | None = None,
        instance: str = "",
    ) -> None:
        self.config = config
        self.routes = routes
        self.outcomes = outcomes
        self.instance = instance or f"{os.getpid()}"
        self.pool = Pool(config.workers, config.share)
        self.limits = config.limits
        self.spool: Any = None  # dispatcher.upload.Spool, set by the server
        self.stopping = False
        self.calls = CallTable(self.pool.wake)
        self._argvs: dict[Path, tuple[tuple[int, int] | None, list[str]]] = {}
        self.warm: WarmPool | None = None
        if config.warm:
            env = dict(os.environ if config.env is None else config.env)
            self.warm = WarmPool(
                sys.executable,
                env,
                max_calls=config.warm_max_calls,
                max_growth=config.warm_max_growth,
            )
        self.grants = Grants()  # who may upload into the VDIs TCP callers made

    # -- plugins -----------------------------------------------------------------

    def plugin_path(self, sr_type: str) -> Path | None:
        name = sr_type.upper() + "SR"
        for path in self._plugin_candidates(sr_type, name):
            if path.is_file() and os.access(path, os.X_OK):
                return path
        return None

    def _plugin_candidates(self, sr_type: str, name: str) -> Iterator[Path]:
        yield self.config.plugins_dir / name
        yield self.config.plugins_dir / sr_type / name
        # the executable's own spelling in its type's directory (plugins/lvmoiscsi/LVMoISCSISR),
        # listed only when neither of the above is there
        with contextlib.suppress(OSError):
            yield from [
                self.config.plugins_dir / sr_type / e
                for e in sorted(os.listdir(self.config.plugins_dir / sr_type))
                if e.upper() == name and e != name
            ]

    def plugin_argv(self, path: Path) -> list[str]:
        """How to execute a plugin: a ``#!/usr/bin/env python3`` one with the
        dispatcher's own interpreter (see ``dispatcher.warm.interpreter``)."""
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        cached = self._argvs.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        interp = interpreter(path, sys.executable)
        argv = [*interp.argv, str(path)] if interp and interp.via_env else [str(path)]
        self._argvs[path] = (stamp, argv)
        return argv

    def prewarm(self) -> None:
        """Start a warm parent for every plugin now (calls run by exec until it is ready)."""
        if self.warm is not None:
            for t in self.plugin_types():
                path = self.plugin_path(t)
                if path is not None:
                    self.warm.spawner(path)

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

    def serve(self, route: str | None, body: bytes, client: str = "") -> Served:
        """``handle`` for a caller on a connection: calls that change something
        keep their outcome until ``settle`` says the reply was delivered; a
        VDI.create grants ``client`` the upload of its data (``grants``)."""
        served = Served(b"", {}, client=client)
        served.out, served.fields = self.handle(route, body, served)
        return served

    def settle(self, served: Served, delivered: bool) -> None:
        if self.outcomes is not None:
            for entry in served.entries:
                self.outcomes.settle(entry, delivered, served.out)

    def handle(
        self, route: str | None, body: bytes, served: Served | None = None
    ) -> tuple[bytes, dict[str, str]]:
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
            out = self._to_type(call, route, body, fields, served)
        else:
            out = self._to_root(call, body, fields, served)
        if fields["outcome"] == "-":
            fields["outcome"] = _outcome(out)
        return out, fields

    def _to_type(
        self,
        call: wire.Call,
        sr_type: str,
        body: bytes,
        fields: dict[str, str],
        served: Served | None = None,
    ) -> bytes:
        if not TYPE_RE.fullmatch(sr_type) or self.plugin_path(sr_type) is None:
            return _backend(
                "UNKNOWN_SR_TYPE",
                f"no plugin serves SR type {sr_type!r} in {self.config.plugins_dir}",
                "known types: " + (", ".join(self.plugin_types()) or "none"),
            )
        out, resp = self._call(call, sr_type, body, fields, served)
        if resp is not None:
            fields["outcome"] = resp.outcome
        sr = call.arg.get("sr")
        if resp is not None and resp.status == "Success" and isinstance(sr, str):
            if call.method == "VDI.create" and served is not None and served.client:
                made = resp.value.get("Value") if isinstance(resp.value, dict) else None
                if isinstance(made, dict) and isinstance(made.get("vdi"), str):
                    self.grants.grant(sr, made["vdi"], served.client)
            if call.method in LEARN_METHODS and _safe(sr):
                self.routes.learn(sr, sr_type)
            elif call.method == "SR.destroy":
                self.routes.forget(sr)
        return out

    def _to_root(
        self,
        call: wire.Call,
        body: bytes,
        fields: dict[str, str],
        served: Served | None = None,
    ) -> bytes:
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
        return self._to_type(call, sr_type, body, fields, served)

    # -- running plugins -----------------------------------------------------------

    def _call(
        self,
        call: wire.Call,
        sr_type: str,
        body: bytes,
        fields: dict[str, str],
        served: Served | None = None,
    ) -> tuple[bytes, wire.Response | None]:
        """Run one plugin on ``body`` as a registered (cancellable) call."""
        rec = self._register(fields["dbg"], call.method, fields["sr"], sr_type)
        if self.config.progress_dir is not None:
            rec.progress_file = self.config.progress_dir / f"{self.instance}-{rec.id}.json"
        try:
            entry = None
            if (
                served is not None
                and self.outcomes is not None
                and self.outcomes.recorded(call.method)
            ):
                key = self.outcomes.key(fields["dbg"], call.method, call.params)
                rec.state = "waiting-for-first-run"
                first = self.outcomes.previous(
                    key,
                    self.limits.budget(call.method).allowed(),
                    lambda: bool(rec.cancel_reason),
                )
                if first is not None:
                    served.entries.append(first[0])
                    log.info("dbg=%s %s: the first run's outcome is answered (%s)",
                             fields["dbg"], call.method, first[0].base.name)  # fmt: skip
                    return first[1], _parse_or_none(first[1])
                entry = self.outcomes.entry(key, rec.id)
                served.entries.append(entry)
            # the value of a Success is relayed as it is, only checked, but
            # for a VDI.create's, which grants its VDI's upload (_to_type)
            need_value = call.method == "VDI.create"
            return self._run_one(rec, sr_type, body, entry, need_value=need_value)
        finally:
            self._unregister(rec)

    def _run_one(
        self,
        rec: CallRecord,
        sr_type: str,
        body: bytes,
        entry: Entry | None = None,
        need_value: bool = True,
    ) -> tuple[bytes, wire.Response | None]:
        """Run the plugin of ``sr_type`` on ``body``; ``need_value``: parse its
        answer in full (else a large Success is only checked, and relayed)."""
        path = self.plugin_path(sr_type)
        if path is None:
            return _backend(
                "UNKNOWN_SR_TYPE", f"no plugin serves SR type {sr_type!r}"
            ), None
        key = rec.sr if rec.sr != "-" else f"type:{sr_type}"
        rec.state = "queued"
        got = self.pool.acquire(
            key, self.config.queue_timeout, lambda: bool(rec.cancel_reason)
        )
        if got == "timeout":
            return self._busy(key), None
        if got == "cancelled":
            return self._cancelled(rec), None
        try:
            env = dict(os.environ if self.config.env is None else self.config.env)
            if rec.progress_file is not None and rec.plugin != "*":
                env[progress.ENV] = str(rec.progress_file)
            if entry is not None:
                env[OUTCOME_ENV] = str(entry.outcome)
            rec.budget = self.limits.budget(rec.method, rec.progress_file)
            rec.state = "running"
            judge = Judge(need_value)
            child = Child(
                self.plugin_argv(path),
                body,
                timeout=self.config.timeout,
                grace=self.config.cancel_grace,
                max_out=self.config.max_response,
                env=env,
                budget=rec.budget,
                on_start=None if entry is None else self._note_start(rec, entry),
                spawner=self.warm.spawner(path) if self.warm is not None else None,
                on_out=judge.feed,
            )
            self.calls.adopt(rec, child)
            result = child.run()
        finally:
            self.pool.release(key)
        return self._judge(rec, path, result, judge)

    @contextlib.contextmanager
    def slot(self, dbg: str, method: str, sr: str, plugin: str) -> Iterator[CallRecord]:
        """Hold one of ``sr``'s slots for work done in the dispatcher itself (an
        upload), registered as a call; NoSlot if none came within the queue timeout."""
        rec = self._register(dbg, method, sr, plugin)
        if self.config.progress_dir is not None:
            rec.progress_file = self.config.progress_dir / f"{self.instance}-{rec.id}.json"
        try:
            got = self.pool.acquire(
                sr, self.config.queue_timeout, lambda: bool(rec.cancel_reason)
            )
            if got != "ok":
                raise NoSlot(
                    "cancelled while waiting for a slot"
                    if got == "cancelled"
                    else self._busy_text(sr)
                )
            try:
                rec.state = "running"
                yield rec
            finally:
                self.pool.release(sr)
        finally:
            self._unregister(rec)

    def _note_start(self, rec: CallRecord, entry: Entry) -> Callable[[int], None]:
        def started(pid: int) -> None:
            assert self.outcomes is not None
            self.outcomes.started(entry, pid, rec.dbg, rec.method, rec.sr)

        return started

    def _busy_text(self, key: str) -> str:
        what = f"SR {key}" if not key.startswith("type:") else f"plugin {key[5:]}"
        return (
            f"no plugin slot for {what} within {self.config.queue_timeout:g}s "
            f"({self.pool.size} slots, at most {self.pool.share} for one SR)"
        )

    def _busy(self, key: str) -> bytes:
        return _backend("DISPATCHER_BUSY", self._busy_text(key))

    def _judge(
        self, rec: CallRecord, path: Path, result: ChildResult, judge: Judge
    ) -> tuple[bytes, wire.Response | None]:
        resp: wire.Response | None = None
        problem = ""
        if result.rc == 0 and not result.overflow:
            try:
                resp = judge.result(result.out)
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
        if result.status_lost:
            return _backend(
                "PLUGIN_FAILED",
                f"{what} gave no valid response, and its warm parent died: its exit status is unknown",
                tail,
            ), None
        if result.spawn_error:
            return _backend(
                "PLUGIN_START_FAILED", f"{what} {result.describe()}", tail
            ), None
        if result.timed_out:
            why = rec.budget.why if rec.budget is not None and rec.budget.why else (
                f"ran past the {self.config.timeout:g}s timeout"
            )
            msg = f"{what} {why}; its process group was killed"
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
        return fanout.fanout(self, call, body)

    # -- the registry of running calls ------------------------------------------

    def _register(self, dbg: str, method: str, sr: str, plugin: str) -> CallRecord:
        return self.calls.register(dbg, method, sr, plugin)

    def _unregister(self, rec: CallRecord) -> None:
        self.calls.unregister(rec)

    def running(self) -> list[CallRecord]:
        return self.calls.running()

    def cancel(self, task: str, reason: str = "cancel") -> int:
        """Cancel every running call whose dbg is ``task``; how many there were."""
        return self.calls.cancel(task, reason)

    def cancel_all(self, reason: str = "stop") -> int:
        return self.calls.cancel_all(reason)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is running; False if some still run after ``timeout``."""
        return self.calls.wait_idle(timeout)

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
        pool = self.pool.stats()
        return {
            "plugins_dir": str(self.config.plugins_dir),
            "plugins": self.plugin_types(),
            "workers": pool["workers"],
            "share": pool["share"],
            "busy": pool["busy"],
            "waiting": pool["waiting"],
            "queues": pool["queues"],
            "running": [r.as_struct() for r in self.running()],
            "srs": [
                {"sr": sr, "type": t} for sr, t in sorted(self.routes.srs().items())
            ],
            "unclaimed": self.outcomes.unclaimed() if self.outcomes else [],
            "spool": self.spool.stats() if self.spool is not None else {},
            "mode": "warm" if self.warm is not None else "exec",
            "warm": self.warm.status() if self.warm is not None else [],
            "stopping": self.stopping,
        }

    def diagnostics(self) -> str:
        st = self.status()
        lines = [
            "== dispatcher ==",
            f"plugins dir: {st['plugins_dir']} ({', '.join(st['plugins']) or 'no plugins'})",
            (
                f"slots: {st['busy']}/{st['workers']} busy (at most {st['share']} per SR), "
                f"{st['waiting']} waiting"
            ),
        ]
        lines += [
            f"  {q['key']}: {q['running']} running, {q['waiting']} waiting"
            for q in st["queues"]
        ]
        lines.append(f"plugin processes: {st['mode']}")
        lines += [
            f"  warm parent of {w['plugin']}: pid {w['pid']} {w['state']}, "
            f"{w['calls']} calls in {w['age']}s, {w['rss'] >> 10} KiB"
            + (f" ({w['why']})" if w["why"] else "")
            for w in st["warm"]
        ]
        lines.append(f"known SRs: {len(st['srs'])}")
        lines += [f"  {s['sr']} ({s['type']})" for s in st["srs"]]
        for r in st["running"]:
            line = f"running: {r['method']} dbg={r['dbg']} sr={r['sr']} {r['seconds']}s {r['state']}"
            p = r.get("progress")
            if p:
                line += f" {p['what']} {p['done']}/{p['total']} bytes"
            lines.append(line)
        lines.append(
            f"unclaimed outcomes (replies lost; a retry of the same call gets them): "
            f"{len(st['unclaimed'])}"
        )
        lines += [
            f"  dbg={u['dbg']} {u['method']} sr={u['sr']} {u['outcome']} "
            f"finished {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(u['finished']))}"
            for u in st["unclaimed"]
        ]
        if st["spool"]:
            sp = st["spool"]
            lines.append(
                f"upload spool: {sp['dir']}: {sp['used']} bytes in {sp['uploads']} upload(s), "
                f"limit {sp['limit']} bytes"
            )
        return "\n".join(lines)


def _safe(sr: str) -> bool:
    try:
        safe_name("sr", sr)
    except InvalidRequest:
        return False
    return True
