"""Talking to the dispatcher from Python: a Unix-socket transport and a client.

Owns:
- ``default_socket(paths)``: where the daemon listens by default.
- ``UnixTransport``: an ``xmlrpc.client.Transport`` over a Unix socket, so
  the standard ``xmlrpc.client.ServerProxy`` works against the daemon::

      import dispatcher.client as c
      sm = c.connect()                       # default socket, POST /
      sm.SR.ls({"dbg": "me"})
      ext = c.connect(path="/ext")           # POST /ext
      c.connect("https://host-a:8443/")      # TCP: mutual TLS (below)

- ``tls_context(cert, key, ca)``: the client side of mutual TLS: this
  client's certificate presented, the dispatcher's verified against the CA.
  Each file comes from the argument, else ``$SM_TLS_CERT`` / ``$SM_TLS_KEY``
  / ``$SM_TLS_CA``, else the host's ``pool.json`` (``smcommon.pool``).  The
  dispatcher's certificate must carry the URL's host name, or the name given
  as ``server_name`` (``$SM_TLS_SERVER_NAME``): a pool's certificates name
  hosts, not addresses.  ``http://`` URLs are for a dispatcher run with
  ``--insecure`` on loopback.

- ``Client``: what smctl uses.  It marshals int64 values as ``<i8>`` (the
  standard marshaller refuses integers beyond 32 bits), and parses replies
  with ``dispatcher.wire``'s safe parser.  ``ConnectError`` means the
  dispatcher could not be reached at all.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import xmlrpc.client
from pathlib import Path
from typing import Any

from smcommon.paths import Paths

from dispatcher import wire

SOCKET_NAME = "sm-dispatcher.sock"
TLS_ENV = {"cert": "SM_TLS_CERT", "key": "SM_TLS_KEY", "ca": "SM_TLS_CA"}
SERVER_NAME_ENV = "SM_TLS_SERVER_NAME"


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


def tls_context(
    cert: str | None = None, key: str | None = None, ca: str | None = None
) -> ssl.SSLContext:
    """The client side of mutual TLS (see the module doc); ConnectError if
    this client has no certificate, key or CA, or they do not load."""
    from smcommon.errors import Error
    from smcommon.pool import PoolConfig

    given = {"cert": cert, "key": key, "ca": ca}
    for k, env in TLS_ENV.items():
        given[k] = given[k] or os.environ.get(env) or None
    try:
        if not all(given.values()):
            pool = PoolConfig.load(Paths.from_env())
            given = {k: v or getattr(pool, k) for k, v in given.items()}
        return PoolConfig(given["cert"], given["key"], given["ca"]).client_context()
    except Error as e:
        raise ConnectError(
            f"cannot speak TLS: {e} (--tls-cert/--tls-key/--tls-ca, "
            f"${TLS_ENV['cert']}/${TLS_ENV['key']}/${TLS_ENV['ca']}, or pool.json)"
        ) from None


class _TlsConnection(http.client.HTTPConnection):
    """HTTPS presenting a client certificate; the server's certificate must
    carry ``server_name`` (default: the URL's host)."""

    def __init__(
        self,
        hostport: str,
        context: ssl.SSLContext,
        server_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(hostport, timeout=timeout)
        self._context = context
        self._server_name = server_name or os.environ.get(SERVER_NAME_ENV) or self.host

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


class TlsTransport(xmlrpc.client.Transport):
    """``xmlrpc.client`` transport for mutual TLS (``tls_context``)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        server_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.server_name = server_name
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0] and self._connection[1]:
            return self._connection[1]
        chost, self._extra_headers, _x509 = self.get_host_info(host)
        conn = _TlsConnection(chost, self.context, self.server_name, self.timeout)
        self._connection = host, conn
        return conn


def connect(
    address: str | Path | None = None,
    *,
    path: str = "/",
    timeout: float | None = None,
    context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> xmlrpc.client.ServerProxy:
    """A ``ServerProxy`` for a URL or a socket path (default socket); an
    ``https://`` URL with ``context`` (default ``tls_context()``)."""
    if isinstance(address, str) and address.startswith("https://"):
        transport = TlsTransport(context or tls_context(), server_name, timeout)
        return xmlrpc.client.ServerProxy(address.rstrip("/") + path, transport=transport)
    if isinstance(address, str) and address.startswith("http://"):
        return xmlrpc.client.ServerProxy(address.rstrip("/") + path)
    sock = Path(address) if address else default_socket()
    return xmlrpc.client.ServerProxy(
        f"http://localhost{path}", transport=UnixTransport(sock, timeout)
    )


class _Stale(Exception):
    """A kept-alive connection the daemon had closed."""


_STALE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, http.client.RemoteDisconnected)


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
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.url: str | None = None
        self.sock: str | None = None
        self.tls = tls
        self.server_name = server_name
        self._conn: http.client.HTTPConnection | None = None
        if isinstance(address, str) and address.startswith(("http://", "https://")):
            self.url = address.rstrip("/")
            if self.url.startswith("https://") and self.tls is None:
                self.tls = tls_context()
        else:
            self.sock = str(address or default_socket())

    def describe(self) -> str:
        return self.url or f"unix:{self.sock}"

    def _split(self) -> tuple[str, str]:
        assert self.url is not None
        hostport, _, path = self.url.split("://", 1)[1].partition("/")
        return hostport, ("/" + path if path else "")

    def _connection(self) -> http.client.HTTPConnection:
        if self.url is not None:
            hostport = self._split()[0]
            if self.tls is not None:
                return _TlsConnection(hostport, self.tls, self.server_name, self.timeout)
            return http.client.HTTPConnection(hostport, timeout=self.timeout)
        assert self.sock is not None
        return _UnixConnection(self.sock, self.timeout)

    def _base_path(self) -> str:
        return "" if self.url is None else self._split()[1]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, path: str, body: bytes) -> bytes:
        """The response body of one POST.  A kept-alive connection the daemon
        closed meanwhile (it closes idle ones) is replaced once, as
        xmlrpc.client does: the call had not reached it (and a changing call
        sent twice gets its first outcome: dispatcher/outcomes.py)."""
        if self._conn is not None:
            try:
                return self._post(path, body)
            except _Stale:
                pass
        return self._post(path, body)

    def _post(self, path: str, body: bytes) -> bytes:
        reused = self._conn is not None
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
            if reused and isinstance(e, _STALE):
                raise _Stale from None
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
