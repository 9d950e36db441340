"""Talking to the dispatcher from Python: a Unix-socket transport and a client.

Owns:
- ``default_socket(paths)``: where the daemon listens by default.
- ``UnixTransport``: an ``xmlrpc.client.Transport`` over a Unix socket, so
  the standard ``xmlrpc.client.ServerProxy`` works against the daemon::

      import dispatcher.client as c
      sm = c.connect()                       # default socket, POST /
      sm.SR.ls({"dbg": "me"})
      ext = c.connect(path="/ext")           # POST /ext
      c.connect("http://127.0.0.1:8080/")    # TCP

- ``Client``: what smctl uses.  It marshals int64 values as ``<i8>`` (the
  standard marshaller refuses integers beyond 32 bits), and parses replies
  with ``dispatcher.wire``'s safe parser.  ``ConnectError`` means the
  dispatcher could not be reached at all.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from pathlib import Path
from typing import Any

from smcommon.paths import Paths

from dispatcher import wire

SOCKET_NAME = "sm-dispatcher.sock"


def default_socket(paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).run_dir / SOCKET_NAME


class ConnectError(Exception):
    """The dispatcher could not be reached (no socket, refused, reset)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, sock_path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.sock_path = sock_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self.sock_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """``xmlrpc.client`` transport over the dispatcher's Unix socket."""

    def __init__(self, sock_path: str | Path, timeout: float | None = None) -> None:
        super().__init__()
        self.sock_path = str(sock_path)
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if (
            self._connection
            and host == self._connection[0]
            and self._connection[1] is not None
        ):
            return self._connection[1]
        conn = _UnixConnection(self.sock_path, self.timeout)
        self._connection = host, conn
        return conn


def connect(
    address: str | Path | None = None, *, path: str = "/", timeout: float | None = None
) -> xmlrpc.client.ServerProxy:
    """A ``ServerProxy`` for a URL (http://...) or a socket path (default socket)."""
    if isinstance(address, str) and address.startswith(("http://", "https://")):
        return xmlrpc.client.ServerProxy(address.rstrip("/") + path)
    sock = Path(address) if address else default_socket()
    return xmlrpc.client.ServerProxy(
        f"http://localhost{path}", transport=UnixTransport(sock, timeout)
    )


class Client:
    """One dispatcher endpoint; ``call(method, args)`` returns the parsed reply.

    With ``keep_alive`` the HTTP connection is kept between calls (and never
    silently retried: a call on a connection the server dropped fails with
    ConnectError, since it may have run); otherwise each call connects anew.
    """

    def __init__(
        self,
        address: str | Path | None = None,
        timeout: float | None = None,
        keep_alive: bool = False,
    ) -> None:
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.url: str | None = None
        self.sock: str | None = None
        self._conn: http.client.HTTPConnection | None = None
        if isinstance(address, str) and address.startswith("http://"):
            self.url = address.rstrip("/")
        else:
            self.sock = str(address or default_socket())

    def describe(self) -> str:
        return self.url or f"unix:{self.sock}"

    def _connection(self) -> http.client.HTTPConnection:
        if self.url is not None:
            rest = self.url[len("http://") :]
            hostport = rest.split("/", 1)[0]
            return http.client.HTTPConnection(hostport, timeout=self.timeout)
        assert self.sock is not None
        return _UnixConnection(self.sock, self.timeout)

    def _base_path(self) -> str:
        if self.url is None:
            return ""
        rest = self.url[len("http://") :]
        return "/" + rest.split("/", 1)[1] if "/" in rest else ""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, path: str, body: bytes) -> bytes:
        conn = self._conn
        if conn is None:
            conn = self._connection()
            try:
                conn.connect()
            except OSError as e:
                raise ConnectError(
                    f"cannot reach the dispatcher at {self.describe()}: {e}"
                ) from None
        keep = False
        try:
            conn.request(
                "POST", self._base_path() + path, body, {"Content-Type": "text/xml"}
            )
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                text = data.decode("utf-8", "replace").strip()
                raise wire.WireError(
                    f"HTTP {resp.status} {resp.reason}: {text}", wire.FAULT_INVALID
                )
            keep = self.keep_alive and not resp.will_close
            return data
        except (OSError, http.client.HTTPException) as e:
            raise ConnectError(
                f"the dispatcher at {self.describe()} dropped the call: {e}"
            ) from None
        finally:
            if keep:
                self._conn = conn
            else:
                self._conn = None
                conn.close()

    def call(self, method: str, args: dict[str, Any], path: str = "/") -> wire.Response:
        return wire.parse_response(self.post(path, wire.dumps_call(method, args)))
