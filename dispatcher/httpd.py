"""The daemon's HTTP layer: listeners (Unix socket; TCP with mutual TLS), requests.

Owns ``Handler`` (one connection's requests), ``UnixServer`` / ``TcpServer``
and ``bind_unix`` / ``bind_tcp``.  Routing and plugins are ``dispatcher.core``'s;
the bounds of connections, deadlines and body memory are
``dispatcher.frontend``'s, applied here:

- ``POST /`` and ``POST /RPC2`` route by SR; ``POST /<type>`` to one plugin;
  ``PUT /data/<sr>/<vdi>``: the data of a VDI.copy from a peer
  (``dispatcher.upload``).  A POST body needs a Content-Length no larger than
  ``max_body`` (beyond: XML-RPC fault -32702, connection closed) and room in
  the body budget (else 503 at once, unread); a body cut short by the client
  is answered 400 at once.
- Anything but an HTTP/1.0 or 1.1 request line (an HTTP/0.9 ``GET /``) is
  answered 400 at once; a request line and headers past ``max_header_bytes``:
  431.
- TCP is mutual TLS (``ssl_context``, from ``smcommon.pool.PoolConfig``): the
  handshake runs in the connection's thread under the request deadline; a
  client whose certificate does not verify, or carries no name of ``allow``,
  is closed before a request is read.  ``--insecure`` (loopback only) serves
  plain HTTP.
- Each caller has a name, given to ``Dispatcher.serve`` and ``upload.put``
  (an upload must come from the peer whose call made the VDI): the allowed
  name its certificate carries, ``unix:<uid>`` on the Unix socket,
  ``insecure:<address>`` with ``--insecure``.
"""

from __future__ import annotations

import contextlib
import grp
import http.server
import logging
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from smcommon.fileio import private_dir
from smcommon.pool import client_names

from dispatcher import upload, wire
from dispatcher.core import TYPE_RE, Dispatcher
from dispatcher.frontend import (
    TIMED_OUT,
    Conn,
    Frontend,
    HeadersTooLarge,
    LimitedReader,
    http_answer,
)

log = logging.getLogger("dispatcher")
call_log = logging.getLogger("dispatcher.calls")


class Refused(Exception):
    """The connection is closed without a request (handshake failed, name not allowed)."""


class Headers:
    """A request's header fields: ``get`` by name in any case, the first
    field of that name (as ``email.message.Message`` answers)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name.lower(), default)


class BadHeaders(Exception):
    def __init__(self, code: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.reason = reason


SMALL_ANSWER = 1 << 16  # an answer written with its head in one write
MAX_HEADER_LINE = 65536  # http.client's limits
MAX_HEADERS = 100


def read_headers(rfile: Any) -> Headers:
    """The header fields up to the empty line (a folded line continues the
    field before it); BadHeaders for a line too long, too many fields or a
    line that is no field."""
    fields: dict[str, str] = {}
    last = ""
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise BadHeaders(431, "Request Header Fields Too Large", "a header line is too long")
        if line in (b"\r\n", b"\n", b""):
            return Headers(fields)
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and last:
            fields[last] = f"{fields[last]} {text.strip()}".strip()
            continue
        name, colon, value = text.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise BadHeaders(400, "Bad Request", f"a header line is no field: {text.strip()[:80]!r}")
        if name not in fields:
            fields[name] = value.strip()
            last = name
        else:
            last = ""  # a repeated field: the first one counts
    raise BadHeaders(431, "Request Header Fields Too Large", f"more than {MAX_HEADERS} header fields")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sm-dispatcher/1"
    # a backstop per socket operation: the front end's watchdog bounds each
    # state of a connection much sooner (dispatcher.frontend)
    timeout = 600
    server: _ServerMixin  # type: ignore[assignment]
    conn: Conn
    client_name: str
    raw_requestline: bytes

    def setup(self) -> None:
        srv = self.server
        self.conn = srv.take_conn(self.request)
        fe = srv.frontend
        if srv.ssl_context is not None:
            fe.set_state(self.conn, "reading")  # the handshake has the request deadline
            raw = self.request
            try:
                tls = srv.ssl_context.wrap_socket(
                    raw, server_side=True, do_handshake_on_connect=False
                )
                self.conn.sock = tls
                tls.settimeout(self.timeout)
                tls.do_handshake()
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning(
                    "refused a TLS client of %s: %s", self.client_address[0], _why(e)
                )
                with contextlib.suppress(OSError):
                    raw.close()
                raise Refused from None
            names = client_names(tls.getpeercert())
            allowed = [n for n in names if n in srv.allow]
            if not allowed:
                log.warning(
                    "refused a TLS client of %s: its certificate names %s, none of "
                    "the allowed clients", self.client_address[0], names or "nothing",
                )  # fmt: skip
                with contextlib.suppress(OSError):
                    tls.close()
                raise Refused
            self.request = tls
            self.client_name = allowed[0]
        elif isinstance(self.client_address, tuple):
            self.client_name = f"insecure:{self.client_address[0]}"
        else:
            self.client_name = self.conn.client
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._raw_rfile = self.rfile

    def handle(self) -> None:
        with contextlib.suppress(Refused):
            super().handle()

    def handle_one_request(self) -> None:
        fe = self.server.frontend
        if not fe.wait_request(self.conn):
            self.close_connection = True
            return
        self.rfile = LimitedReader(self._raw_rfile, fe.limits.max_header_bytes)  # type: ignore[assignment]
        try:
            super().handle_one_request()
        except HeadersTooLarge:
            self._raw(431, "Request Header Fields Too Large",
                      "the request line and headers are too large")  # fmt: skip
            self.close_connection = True
        finally:
            self.rfile = self._raw_rfile

    def parse_request(self) -> bool:
        """What http.server's does for HTTP/1.x, with the header fields read
        here: its email.parser took a third of the daemon's own time per call."""
        self.close_connection = True
        words = self.raw_requestline.split()
        digits = words[2][7:] if len(words) == 3 and words[2].startswith(b"HTTP/1.") else b""
        if not digits.isdigit():
            self._raw(400, "Bad Request", "only HTTP/1.0 and HTTP/1.1 requests are served")
            return False
        minor = int(digits)
        self.command, path, self.request_version = (w.decode("iso-8859-1") for w in words)
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path
        try:
            self.headers = read_headers(self.rfile)  # type: ignore[assignment]
        except BadHeaders as e:
            self._raw(e.code, e.reason, str(e))
            return False
        conntype = self.headers.get("Connection", "").lower()
        if conntype in ("close", "keep-alive"):
            self.close_connection = conntype == "close"
        else:  # HTTP/1.1 keeps the connection, 1.0 closes it
            self.close_connection = minor < 1
        if self.headers.get("Expect", "").lower() == "100-continue" and minor >= 1:
            return self.handle_expect_100()
        return True

    def _raw(self, code: int, reason: str, text: str) -> None:
        """An answer written as it is (no parsed request to answer through)."""
        with contextlib.suppress(OSError, ValueError):
            self.wfile.write(http_answer(code, reason, text))

    def address_string(self) -> str:
        return (
            self.client_address[0] if isinstance(self.client_address, tuple) else "unix"
        )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def _reply(
        self, code: int, body: bytes, ctype: str = "text/xml", close: bool = False
    ) -> None:
        fe = self.server.frontend
        fe.set_state(self.conn, "writing")
        self.log_request(code, len(body))
        if close:
            self.close_connection = True
        lines = [
            f"{self.protocol_version} {code} {self.responses[code][0]}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
        ]
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # one write for a small answer: one wake-up of the client, not two
        if len(body) <= SMALL_ANSWER:
            self.wfile.write(head + body)
        else:
            self.wfile.write(head)
            self.wfile.write(body)
        fe.set_state(self.conn, "busy")

    def do_GET(self) -> None:
        self._reply(
            405,
            b"sm-dispatcher speaks XML-RPC: POST / or /<type>\n",
            "text/plain",
            close=True,
        )

    def _length(self) -> int | None:
        """The request's Content-Length; None (answered 411) if there is none."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(
                411,
                b"a Content-Length is required (chunked bodies are not accepted)\n",
                "text/plain",
                True,
            )
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self._reply(
                411, b"a valid Content-Length is required\n", "text/plain", close=True
            )
            return None
        return length

    def do_POST(self) -> None:
        disp = self.server.dispatcher
        fe = self.server.frontend
        started = time.monotonic()
        length = self._length()
        if length is None:
            return
        limit = disp.config.max_body
        if length > limit:
            self._drain(length)
            msg = f"the request body is {length} bytes, more than the limit of {limit} bytes"
            call_log.info(
                "dbg=- method=- sr=- plugin=- duration=0.000s client=%s outcome=TooLarge(%d)",
                clean(self.client_name), length,
            )  # fmt: skip
            self._reply(200, wire.dumps_fault(wire.FAULT_TOO_LARGE, msg), close=True)
            return
        who = self.conn.client
        if not fe.budget.reserve(who, length):
            self._reply(
                503,
                b"the dispatcher holds as many request bodies as it may: retry\n",
                "text/plain",
                close=True,
            )
            return
        try:
            body = self.rfile.read(length)
            if len(body) != length:
                self._reply(
                    400,
                    f"the body ended after {len(body)} of {length} bytes\n".encode(),
                    "text/plain",
                    close=True,
                )
                return
            fe.set_state(self.conn, "busy")
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
                served = disp.serve(route, body, self.client_name)
                del body
                duration = time.monotonic() - started
                try:
                    self._reply(200, served.out, close=disp.stopping)
                except BaseException:
                    disp.settle(served, delivered=False)
                    raise
                finally:  # after the answer, which waits for no log write
                    fields = served.fields
                    call_log.info(
                        "dbg=%s method=%s sr=%s plugin=%s duration=%.3fs client=%s outcome=%s",
                        clean(fields["dbg"]), clean(fields["method"]), clean(fields["sr"]),
                        fields["plugin"], duration, clean(self.client_name), fields["outcome"],
                    )  # fmt: skip
                disp.settle(served, delivered=True)
            finally:
                self.server.leave()
        finally:
            fe.budget.release(who, length)

    def do_PUT(self) -> None:
        """``PUT /data/<sr>/<vdi>``: a remote VDI.copy's data (dispatcher.upload)."""
        started = time.monotonic()
        fe = self.server.frontend
        fe.set_state(self.conn, "busy")
        self.connection.settimeout(fe.limits.stall_timeout)
        self.server.enter()
        try:
            disp = self.server.dispatcher
            code, body, ctype = upload.put(
                disp, self.path, self.headers, self.rfile, client=self.client_name
            )
            call_log.info(
                "dbg=- method=PUT sr=- plugin=- duration=%.3fs client=%s outcome=HTTP%d path=%s",
                time.monotonic() - started, clean(self.client_name), code, clean(self.path),
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
        """Read and drop an unread body (bounded in bytes, and in time by the
        request deadline), so that the client sees our answer."""
        self.server.frontend.set_state(self.conn, "reading")
        budget = min(length, 8 * self.server.dispatcher.config.max_body + (1 << 20))
        with contextlib.suppress(OSError, ValueError):
            self.connection.settimeout(5)
            while budget > 0:
                chunk = self.rfile.read(min(budget, 1 << 16))
                if not chunk:
                    break
                budget -= len(chunk)


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return getattr(e, "verify_message", None) or e.reason or str(e)
    return str(e) or type(e).__name__


def clean(text: str, limit: int = 200) -> str:
    """A request's string made safe for one log line (no newlines, bounded)."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


class _ServerMixin:
    dispatcher: Dispatcher
    frontend: Frontend
    ssl_context: ssl.SSLContext | None = None
    allow: frozenset[str] = frozenset()
    # connections the kernel queues before accept: socketserver's 5 makes a
    # burst of clients fail to connect (EAGAIN on a Unix socket with a timeout)
    request_queue_size = 128
    daemon_threads = True
    block_on_close = False
    _conn_lock: threading.Lock
    _in_flight: int
    _admitted: dict[int, Conn]

    def init_limits(self, dispatcher: Dispatcher, frontend: Frontend) -> None:
        self.dispatcher = dispatcher
        self.frontend = frontend
        self._conn_lock = threading.Lock()
        self._in_flight = 0
        self._admitted = {}

    def enter(self) -> None:
        with self._conn_lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._conn_lock:
            self._in_flight -= 1

    def in_flight(self) -> int:
        with self._conn_lock:
            return self._in_flight

    def take_conn(self, request: Any) -> Conn:
        with self._conn_lock:
            return self._admitted[id(request)]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (client gone mid-call): one log line, no traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.info("connection dropped by the client: %s", exc)
        elif isinstance(exc, (ValueError, Refused)):
            log.info("connection ended: %s", exc or type(exc).__name__)
        else:
            log.exception("unexpected error on a connection")

    def process_request(self, request: Any, client_address: Any) -> None:
        conn = self.frontend.admit(request, client_address)
        if conn is None:
            answer = self.frontend.refusal(request, client_address)
            log.info(
                "refused a connection of %s: %s",
                client_address[0] if isinstance(client_address, tuple) else "unix",
                answer.split(b"\r\n\r\n", 1)[-1].strip().decode(),
            )
            if self.ssl_context is None:  # a TLS client would read it as garbage
                with contextlib.suppress(OSError):
                    request.send(answer, socket.MSG_DONTWAIT)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        with self._conn_lock:
            self._admitted[id(request)] = conn
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._forget(request, conn)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            conn = self._admitted.get(id(request))
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._forget(request, conn)

    def _forget(self, request: Any, conn: Conn | None) -> None:
        if conn is not None:
            self.frontend.leave(conn)
            with contextlib.suppress(OSError):
                conn.sock.close()  # the TLS wrapper, when there is one
        with self._conn_lock:
            self._admitted.pop(id(request), None)


class UnixServer(_ServerMixin, socketserver.ThreadingUnixStreamServer):
    pass


class TcpServer(_ServerMixin, socketserver.ThreadingTCPServer):
    allow_reuse_address = True


def bind_unix(
    path: Path, dispatcher: Dispatcher, frontend: Frontend, group: str | None = None
) -> UnixServer:
    """Listen on ``path``: mode 0600 (root only), or 0660 for ``group``, whose
    members may then pass through its directory (0710, that group)."""
    private_dir(path.parent)
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
    gid = -1
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SystemExit(f"sm-dispatcher: --socket-group {group}: no such group") from None
    old = os.umask(0o177)  # never reachable by others, not even for a moment
    try:
        srv = UnixServer(str(path), Handler, bind_and_activate=True)
    finally:
        os.umask(old)
    if gid >= 0:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        os.chown(path.parent, -1, gid)
        os.chmod(path.parent, 0o710)
    srv.init_limits(dispatcher, frontend)
    return srv


def bind_tcp(
    host: str,
    port: int,
    dispatcher: Dispatcher,
    frontend: Frontend,
    ssl_context: ssl.SSLContext | None,
    allow: list[str],
) -> TcpServer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class _Tcp(TcpServer):
        address_family = family

    srv = _Tcp((host, port), Handler)
    srv.init_limits(dispatcher, frontend)
    srv.ssl_context = ssl_context
    srv.allow = frozenset(allow)
    return srv


__all__ = ["TIMED_OUT", "Handler", "TcpServer", "UnixServer", "bind_tcp", "bind_unix"]
