"""The ``sm-dispatcher`` daemon: HTTP over a Unix socket (and TCP), start, stop.

Owns the HTTP layer (``Handler``), the listening servers, the command line,
the embedded default SR and the daemon's life cycle.  Routing and plugin
processes are ``dispatcher.core``'s.

- Listens on ``<run_dir>/sm-dispatcher.sock`` by default (``--socket``), and on
  TCP when asked (``--tcp [HOST:]PORT``; HOST defaults to 127.0.0.1).
- ``POST /`` and ``POST /RPC2`` route by SR; ``POST /<type>`` to one plugin.
- ``PUT /data/<sr>/<vdi>``: the data of a VDI.copy from another host
  (``dispatcher.upload``).
- Request limits: a body must have a Content-Length no larger than
  ``--max-body``; a bigger one gets an XML-RPC fault (-32702) and the
  connection is closed; a body with a DTD gets fault -32701.  At most
  ``--max-connections`` connections are served at once (503 beyond).
- SIGTERM/SIGINT: stop accepting, let in-flight calls finish within
  ``--stop-timeout``, then cancel the rest (SIGTERM, SIGKILL after
  ``--cancel-grace``), remove socket and pid file, exit 0.
- One log line per call (logger ``dispatcher.calls``):
  ``dbg=... method=... sr=... plugin=... duration=...s outcome=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import shutil
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smcommon.engine.remote import import_dir
from smcommon.paths import Paths

from dispatcher import client, options, upload, wire
from dispatcher.core import TYPE_RE, Config, Dispatcher
from dispatcher.outcomes import OutcomeStore
from dispatcher.routes import RouteTable

log = logging.getLogger("dispatcher")
call_log = logging.getLogger("dispatcher.calls")

REPO_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
PLUGINS_ENV = "SM_PLUGINS_DIR"
DEFAULT_SR_NAMESPACE = uuid.UUID("6f1d3a52-6a4b-4c69-9a3e-2f1f6f0c7d11")
DEFAULT_SR_TYPE = "ext"


def default_plugins_dir() -> Path:
    return Path(os.environ.get(PLUGINS_ENV) or REPO_PLUGINS)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sm-dispatcher/1"
    timeout = 120  # an idle or stalled connection is dropped after this
    server: _ServerMixin  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)

    def address_string(self) -> str:
        return (
            self.client_address[0] if isinstance(self.client_address, tuple) else "unix"
        )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def _reply(
        self, code: int, body: bytes, ctype: str = "text/xml", close: bool = False
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(
            405,
            b"sm-dispatcher speaks XML-RPC: POST / or /<type>\n",
            "text/plain",
            close=True,
        )

    def do_POST(self) -> None:
        disp = self.server.dispatcher
        started = time.monotonic()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(
                411,
                b"a Content-Length is required (chunked bodies are not accepted)\n",
                "text/plain",
                True,
            )
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self._reply(
                411, b"a valid Content-Length is required\n", "text/plain", close=True
            )
            return
        limit = disp.config.max_body
        if length > limit:
            self._drain(length)
            msg = f"the request body is {length} bytes, more than the limit of {limit} bytes"
            call_log.info(
                "dbg=- method=- sr=- plugin=- duration=0.000s outcome=TooLarge(%d)",
                length,
            )
            self._reply(200, wire.dumps_fault(wire.FAULT_TOO_LARGE, msg), close=True)
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        route: str | None = None
        if path not in ("", "/RPC2"):
            route = path.lstrip("/")
            if "/" in route or not TYPE_RE.fullmatch(route):
                msg = f"no such endpoint {self.path!r}: POST / or /<type> (a lower-case SR type)\n"
                self._reply(404, msg.encode(), "text/plain")
                return
        self.server.enter()
        try:
            served = disp.serve(route, body)
            fields = served.fields
            call_log.info(
                "dbg=%s method=%s sr=%s plugin=%s duration=%.3fs outcome=%s",
                _clean(fields["dbg"]), _clean(fields["method"]), _clean(fields["sr"]),
                fields["plugin"], time.monotonic() - started, fields["outcome"],
            )  # fmt: skip
            try:
                self._reply(200, served.out, close=disp.stopping)
            except BaseException:
                disp.settle(served, delivered=False)
                raise
            disp.settle(served, delivered=True)
        finally:
            self.server.leave()

    def do_PUT(self) -> None:
        """``PUT /data/<sr>/<vdi>``: a remote VDI.copy's data (dispatcher.upload)."""
        started = time.monotonic()
        self.server.enter()
        try:
            disp = self.server.dispatcher
            code, body, ctype = upload.put(disp, self.path, self.headers, self.rfile)
            call_log.info(
                "dbg=- method=PUT sr=- plugin=- duration=%.3fs outcome=HTTP%d path=%s",
                time.monotonic() - started, code, _clean(self.path),
            )  # fmt: skip
            # a refused body was not read: the connection cannot go on
            self._reply(code, body, ctype, close=code != 200 or disp.stopping)
            if code != 200:
                # read (bounded) what the sender still sends, so that closing
                # does not reset the connection before it has read the answer
                self._drain(1 << 62)
        finally:
            self.server.leave()

    def _drain(self, length: int) -> None:
        """Read and drop an oversized body (bounded), so the client sees our answer."""
        budget = min(length, 8 * self.server.dispatcher.config.max_body + (1 << 20))
        self.connection.settimeout(5)
        try:
            while budget > 0:
                chunk = self.rfile.read(min(budget, 1 << 16))
                if not chunk:
                    break
                budget -= len(chunk)
        except OSError:
            pass


def _clean(text: str, limit: int = 200) -> str:
    """A request's string made safe for one log line (no newlines, bounded)."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


class _ServerMixin:
    dispatcher: Dispatcher
    max_connections: int = 512
    # connections the kernel queues before accept: socketserver's 5 makes a
    # burst of clients fail to connect (EAGAIN on a Unix socket with a timeout)
    request_queue_size = 128
    daemon_threads = True
    block_on_close = False
    _conn_lock: threading.Lock
    _connections: int
    _in_flight: int

    def init_limits(self, dispatcher: Dispatcher, max_connections: int) -> None:
        self.dispatcher = dispatcher
        self.max_connections = max_connections
        self._conn_lock = threading.Lock()
        self._connections = 0
        self._in_flight = 0

    def enter(self) -> None:
        with self._conn_lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._conn_lock:
            self._in_flight -= 1

    def in_flight(self) -> int:
        with self._conn_lock:
            return self._in_flight

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (client gone mid-call): one log line, no traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.info("connection dropped by the client: %s", exc)
        else:
            log.exception("unexpected error on a connection")

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            try:
                request.sendall(
                    b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)  # type: ignore[misc]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            with self._conn_lock:
                self._connections -= 1


class UnixServer(_ServerMixin, socketserver.ThreadingUnixStreamServer):
    pass


class TcpServer(_ServerMixin, socketserver.ThreadingTCPServer):
    allow_reuse_address = True


def _bind_unix(path: Path, dispatcher: Dispatcher, max_connections: int) -> UnixServer:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens there
        else:
            raise SystemExit(
                f"sm-dispatcher: another dispatcher already listens on {path}"
            )
        finally:
            probe.close()
    old = os.umask(0o117)
    try:
        srv = UnixServer(str(path), Handler, bind_and_activate=True)
    finally:
        os.umask(old)
    srv.init_limits(dispatcher, max_connections)
    return srv


def _bind_tcp(spec: str, dispatcher: Dispatcher, max_connections: int) -> TcpServer:
    host, _, port = spec.rpartition(":")
    srv = TcpServer((host or "127.0.0.1", int(port)), Handler)
    srv.init_limits(dispatcher, max_connections)
    return srv


def _clean_progress(directory: Path | None) -> None:
    """A fresh progress directory (what an earlier run left is stale)."""
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in directory.iterdir():
        with contextlib.suppress(OSError):
            f.unlink()


# -- the embedded default SR ----------------------------------------------------


def ensure_default_sr(
    dispatcher: Dispatcher, directory: Path, sr_uuid: str | None
) -> str:
    """Create (first time) or attach the ext SR on ``directory``; its uuid."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    known = dispatcher.routes.default_for(str(directory))
    sr = known or sr_uuid or str(uuid.uuid5(DEFAULT_SR_NAMESPACE, str(directory)))
    dc = {"path": str(directory)}
    dbg = f"sm-dispatcher-default-sr-{os.getpid()}"
    problems = []
    if not known:
        # a failed create is not fatal: the SR may exist from an earlier table
        err = _call_ext(
            dispatcher,
            "SR.create",
            {"dbg": dbg, "sr": sr, "device_config": dc, "physical_size": 0},
        )
        if err:
            problems.append(f"SR.create: {' '.join(err)}")
    err = _call_ext(
        dispatcher, "SR.attach", {"dbg": dbg, "sr": sr, "device_config": dc}
    )
    if err and err[0] != "Sr_attached":
        problems.append(f"SR.attach: {' '.join(err)}")
        raise SystemExit(
            f"sm-dispatcher: cannot set up the default SR on {directory}: {'; '.join(problems)}"
        )
    dispatcher.routes.set_default(str(directory), sr, DEFAULT_SR_TYPE)
    return sr


def _call_ext(dispatcher: Dispatcher, method: str, args: dict[str, Any]) -> list[str]:
    """Call the ext plugin through the dispatcher; the ErrorDescription, [] if fine."""
    out, _fields = dispatcher.handle(DEFAULT_SR_TYPE, wire.dumps_call(method, args))
    resp = wire.parse_response(out)
    if resp.status == "Success":
        return []
    return resp.error or [f"fault {resp.fault}"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return options.parse_args(argv, default_plugins_dir())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options.setup_logging(args)
    paths = Paths.from_env()
    plugins_dir = (args.plugins_dir or default_plugins_dir()).resolve()
    instance = uuid.uuid4().hex[:12]
    config = Config(
        plugins_dir=plugins_dir,
        timeout=args.timeout,
        workers=args.workers,
        queue_timeout=args.queue_timeout,
        max_body=args.max_body,
        cancel_grace=args.cancel_grace,
        env=dict(os.environ),
        import_dir=import_dir(paths),
        share=args.share,
        short_timeout=args.short_timeout,
        min_rate=args.min_rate,
        stall_timeout=args.stall_timeout,
        progress_dir=paths.run_dir / "progress",
        max_spool=args.max_spool,
        spool_reserve=args.spool_reserve,
        warm=not args.no_warm,
        warm_max_calls=args.warm_max_calls,
    )
    try:
        outcomes = OutcomeStore(
            paths.state_dir / "dispatcher" / "outcomes",
            instance,
            ttl=args.outcome_ttl,
            max_records=args.max_outcomes,
        )
        outcomes.prune()
        _clean_progress(config.progress_dir)
    except OSError as e:
        raise SystemExit(f"sm-dispatcher: cannot set up its state: {e}") from None
    dispatcher = Dispatcher(
        config, RouteTable.for_host(paths), outcomes, instance=instance
    )
    dispatcher.spool = upload.Spool(
        import_dir(paths), config.max_spool, config.spool_reserve
    )
    dispatcher.spool.clean()
    unclaimed = outcomes.unclaimed()
    if unclaimed:
        log.info(
            "%d unclaimed outcome(s) of calls whose reply was lost: a retry of the "
            "same call gets it (Dispatcher.status lists them)",
            len(unclaimed),
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    servers: list[socketserver.BaseServer] = []
    sock_path = (
        None if args.no_socket else (args.socket or client.default_socket(paths))
    )
    try:
        if sock_path is not None:
            servers.append(_bind_unix(sock_path, dispatcher, args.max_connections))
        if args.tcp:
            servers.append(_bind_tcp(args.tcp, dispatcher, args.max_connections))
    except OSError as e:
        for srv in servers:
            srv.server_close()
        raise SystemExit(f"sm-dispatcher: cannot listen: {e}") from None
    pid_file = args.pid_file or paths.run_dir / "sm-dispatcher.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    threads = [
        threading.Thread(
            target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        for s in servers
    ]
    for t in threads:
        t.start()
    try:
        dispatcher.prewarm()
        default_sr = None
        if args.default_sr is not None:
            default_sr = ensure_default_sr(
                dispatcher, args.default_sr, args.default_sr_uuid
            )
        _announce(dispatcher, sock_path, servers, default_sr, args)
        while not stop.wait(3600):
            pass
        log.info(
            "stopping: no new connections; waiting up to %gs for %d call(s)",
            args.stop_timeout,
            len(dispatcher.running()),
        )
    finally:
        # Stopping already: a repeated SIGTERM/SIGINT must not kill us half-way,
        # nor during interpreter finalization (which restores SIG_DFL).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        if sock_path is not None:
            try:
                sock_path.unlink()
            except FileNotFoundError:
                pass
        dispatcher.stopping = True
        if not dispatcher.wait_idle(args.stop_timeout):
            n = dispatcher.cancel_all("stop")
            log.warning("stopping: cancelling %d call(s) still running", n)
            dispatcher.wait_idle(args.cancel_grace + 5)
        if dispatcher.warm is not None:
            dispatcher.warm.close()
        try:
            pid_file.unlink()
        except FileNotFoundError:
            pass
    # let handler threads write the last responses (bounded)
    deadline = time.monotonic() + 2
    while any(srv.in_flight() for srv in servers) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    log.info("stopped")
    return 0


def _smctl_command() -> str:
    """How a person types smctl here: ``smctl`` if PATH finds this one, else its path."""
    mine = Path(sys.executable).parent / "smctl"
    found = shutil.which("smctl")
    if found and os.path.realpath(found) == os.path.realpath(mine):
        return "smctl"
    try:
        return os.path.relpath(mine) if mine.resolve().is_relative_to(Path.cwd()) else str(mine)
    except (OSError, ValueError):
        return str(mine)


def _announce(
    dispatcher: Dispatcher,
    sock_path: Path | None,
    servers: list[socketserver.BaseServer],
    default_sr: str | None,
    args: argparse.Namespace,
) -> None:
    plugins = dispatcher.plugin_types()
    smctl = _smctl_command()
    lines = [f"sm-dispatcher ready (pid {os.getpid()})"]
    lines.append(
        f"  plugins: {', '.join(plugins) or 'none'} (from {dispatcher.config.plugins_dir})"
    )
    lines.append(
        "  plugin processes: "
        + ("forked from warm parents (--no-warm: executed)" if dispatcher.warm else "executed (--no-warm)")
    )
    address = ""
    if sock_path is not None:
        lines.append(f"  unix socket: {sock_path}")
        address = f"--socket {sock_path}"
    for srv in servers:
        if isinstance(srv, TcpServer):
            host, port = srv.server_address[0], srv.server_address[1]
            host = host.decode() if isinstance(host, bytes) else host
            lines.append(f"  tcp: http://{host}:{port}/")
            if not address:
                address = f"--url http://{host}:{port}/"
    if default_sr:
        lines.append(f"  default SR: {default_sr} (ext on {args.default_sr.resolve()})")
        lines.append(
            f"  try: {smctl} {address} vdi-create {default_sr} --name d0 --size 10M"
        )
        lines.append(f"       {smctl} {address} vdi-list {default_sr}")
    else:
        lines.append(f"  try: {smctl} {address} sr-ls")
    target = (
        repr(str(sock_path)) if sock_path is not None else repr(address.split()[-1])
    )
    lines.append(
        f"  python: import dispatcher.client as c; c.connect({target}).SR.ls({{'dbg': 'me'}})"
    )
    print("\n".join(lines), flush=True)
    log.info("listening: %s", "; ".join(lines[1:]))


if __name__ == "__main__":
    sys.exit(main())
