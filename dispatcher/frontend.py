"""The front end's bounds: connections, deadlines and request memory that
hostile clients cannot exhaust.

Owns ``Frontend`` (one per listener), ``BodyBudget`` (one per daemon: the
memory of request bodies, shared by the listeners) and ``Conn`` (one accepted
connection).  A connection is in one state at a time, each bounded:

- ``idle``: waiting for a request (new, or kept alive): closed after
  ``idle_timeout``; when a new connection finds the listener full, the oldest
  idle connection is closed to make room (``evicted``);
- ``reading``: a request has begun (its first byte came, or the TLS handshake
  runs): all of it (request line, headers, body) must arrive within
  ``request_timeout`` however slowly the bytes trickle in, else ``408`` and
  the connection is closed; at most ``max_reading`` connections read at once:
  beyond, the one reading the longest is closed (a real request takes
  milliseconds; a slow sender does not keep a place);
- ``busy``: its call runs (the plugin's time is the call's budget, not ours);
  an upload's body streams to disk, each read bounded by ``stall_timeout``;
- ``writing``: its answer is sent, within ``request_timeout`` (a client that
  does not read its answer does not keep a thread).

Per client (its address on TCP; the Unix socket is root's or one group's and
has no per-client bound): at most ``max_per_client`` connections (beyond, its
own oldest idle one is closed, else ``503`` at once).  Bodies: a request body
is read only once ``BodyBudget`` grants its Content-Length (all listeners'
bodies in memory together stay under ``max_inflight``, one client's under a
quarter of it, at least one ``max_body``; an ordinary call's small body is
always granted); else ``503`` at once, unread.
Request line and headers: at most ``max_header_bytes`` (``431``).

A watchdog thread enforces the deadlines: it sends the ``408`` (plain HTTP
only: a TLS socket is not written by two threads) and shuts the socket down,
which ends the blocked read or write of the connection's thread.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from typing import Any

from smcommon.record import record

log = logging.getLogger(__name__)

WATCH_EVERY = 0.1  # seconds between two looks of the watchdog


@record(frozen=True)
class Limits:
    request_timeout: float = 20.0
    idle_timeout: float = 30.0
    stall_timeout: float = 60.0
    max_connections: int = 512
    max_reading: int = 128
    max_per_client: int | None = 64  # None: no per-client bound (the Unix socket)
    max_header_bytes: int = 64 << 10


class Conn:
    __slots__ = ("answer", "client", "deadline", "id", "since", "sock", "state")

    def __init__(self, conn_id: int, sock: Any, client: str) -> None:
        self.id = conn_id
        self.sock = sock
        self.client = client
        self.state = "idle"
        self.since = time.monotonic()
        self.deadline = 0.0
        self.answer = b""  # what the watchdog sends before closing (408)


def client_of(sock: Any, address: Any) -> str:
    """Who a connection is, for per-client bounds: ``ip:<addr>`` or ``unix:<uid>``."""
    if isinstance(address, tuple) and address:
        return f"ip:{address[0]}"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return f"unix:{int.from_bytes(creds[4:8], 'little')}"
    except OSError:
        return "unix:?"


def http_answer(code: int, reason: str, text: str) -> bytes:
    body = f"{text}\n".encode()
    return (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


TIMED_OUT = http_answer(408, "Request Timeout", "the request did not arrive in time")


SMALL_BODY = 64 << 10  # an ordinary call's body: always granted (see BodyBudget)


class BodyBudget:
    """Bytes of request bodies held in memory, by all connections together.

    Bodies of at most ``SMALL_BODY`` bytes (a call is a few KiB) are always
    granted: their memory is bounded by the connections (``max_connections``
    times ``SMALL_BODY``), and a flood of big bodies cannot refuse them.
    Bigger ones share ``max_inflight``, one client at most a quarter of it."""

    def __init__(self, max_inflight: int = 64 << 20, max_body: int = 4 << 20) -> None:
        self.max_inflight = max_inflight
        self.share = max(max_inflight // 4, max_body)
        self._lock = threading.Lock()
        self.held = 0
        self.refused = 0
        self._by_client: dict[str, int] = {}

    def reserve(self, client: str, n: int) -> bool:
        if n <= SMALL_BODY:
            return True
        with self._lock:
            mine = self._by_client.get(client, 0)
            if self.held + n > self.max_inflight or mine + n > self.share:
                self.refused += 1
                return False
            self.held += n
            self._by_client[client] = mine + n
            return True

    def release(self, client: str, n: int) -> None:
        if n <= SMALL_BODY:
            return
        with self._lock:
            self.held -= n
            left = self._by_client.get(client, 0) - n
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)


class Frontend:
    def __init__(self, limits: Limits | None = None, budget: BodyBudget | None = None) -> None:
        self.limits = limits or Limits()
        self.budget = budget or BodyBudget()
        self._lock = threading.Lock()
        self._conns: dict[int, Conn] = {}
        self._next = 0
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.evicted = 0
        self.timed_out = 0
        self.refused = 0

    # -- connections ---------------------------------------------------------------

    def admit(self, sock: Any, address: Any) -> Conn | None:
        """Register a new connection, closing an idle one if full; None: refuse
        it (the caller sends ``refusal()`` and closes)."""
        client = client_of(sock, address)
        lim = self.limits
        victims: list[Conn] = []
        with self._lock:
            if lim.max_per_client is not None:
                mine = [c for c in self._conns.values() if c.client == client]
                if len(mine) >= lim.max_per_client:
                    v = _oldest(mine, "idle")
                    if v is None:
                        self.refused += 1
                        return None
                    victims.append(v)
            if len(self._conns) - len(victims) >= lim.max_connections:
                v = _oldest([c for c in self._conns.values() if c not in victims], "idle")
                if v is None:
                    self.refused += 1
                    return None
                victims.append(v)
            for v in victims:
                del self._conns[v.id]
                self.evicted += 1
            self._next += 1
            conn = Conn(self._next, sock, client)
            conn.deadline = time.monotonic() + lim.idle_timeout
            self._conns[conn.id] = conn
        for v in victims:
            log.info("connection of %s closed: idle, to make room", v.client)
            shut(v.sock)
        self._start_watchdog()
        return conn

    def refusal(self, sock: Any, address: Any) -> bytes:
        client = client_of(sock, address)
        with self._lock:
            mine = sum(1 for c in self._conns.values() if c.client == client)
        per = self.limits.max_per_client
        if per is not None and mine >= per:
            why = f"{client} holds {mine} connections, the most one client may"
        else:
            why = f"all {self.limits.max_connections} connections are busy"
        return http_answer(503, "Busy", why)

    def leave(self, conn: Conn) -> None:
        with self._lock:
            self._conns.pop(conn.id, None)

    def alive(self, conn: Conn) -> bool:
        with self._lock:
            return conn.id in self._conns

    def set_state(self, conn: Conn, state: str, answer: bytes = b"") -> None:
        """idle / reading / busy / writing (see the module doc); ``answer`` is
        what the watchdog sends at the deadline (plain HTTP only)."""
        now = time.monotonic()
        lim = self.limits
        victim = None
        with self._lock:
            conn.state = state
            conn.since = now
            conn.answer = answer
            if state == "idle":
                conn.deadline = now + lim.idle_timeout
            elif state in ("reading", "writing"):
                conn.deadline = now + lim.request_timeout
                if state == "reading":
                    readers = [c for c in self._conns.values() if c.state == "reading"]
                    if len(readers) > lim.max_reading:
                        victim = _oldest([c for c in readers if c is not conn], "reading")
                        if victim is not None:
                            del self._conns[victim.id]
                            self.evicted += 1
            else:
                conn.deadline = 0.0
        if victim is not None:
            log.info("connection of %s closed: still reading its request, to make room",
                     victim.client)  # fmt: skip
            self._close(victim)

    def wait_request(self, conn: Conn) -> bool:
        """Block until the connection has bytes (or ends); it is then ``reading``.
        False if it ended (closed, evicted, idle too long)."""
        self.set_state(conn, "idle")
        sock = conn.sock
        pending = getattr(sock, "pending", None)
        try:
            if not (pending is not None and pending()):
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLPRI)
                while not poller.poll(1000):
                    if not self.alive(conn):
                        return False
        except (OSError, ValueError):
            return False
        if not self.alive(conn):
            return False
        self.set_state(conn, "reading", TIMED_OUT)
        return True

    # -- the watchdog ------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, daemon=True, name="frontend-watchdog"
                )
                self._watchdog.start()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            now = time.monotonic()
            late: list[Conn] = []
            with self._lock:
                for c in list(self._conns.values()):
                    if c.deadline and now >= c.deadline:
                        late.append(c)
                        del self._conns[c.id]
                        if c.state != "idle":
                            self.timed_out += 1
            for c in late:
                log.info("connection of %s closed: %s past its deadline", c.client, c.state)
                self._close(c)

    @staticmethod
    def _close(c: Conn) -> None:
        if c.answer and not hasattr(c.sock, "pending"):  # not TLS
            with contextlib.suppress(OSError, ValueError):
                c.sock.send(c.answer, socket.MSG_DONTWAIT)
        shut(c.sock)

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            states: dict[str, int] = {}
            for c in self._conns.values():
                states[c.state] = states.get(c.state, 0) + 1
            return {
                "connections": len(self._conns),
                "states": states,
                "evicted": self.evicted,
                "timed_out": self.timed_out,
                "refused": self.refused,
            }


def _oldest(conns: list[Conn], state: str) -> Conn | None:
    those = [c for c in conns if c.state == state]
    return min(those, key=lambda c: c.since) if those else None


def shut(sock: Any) -> None:
    """End a connection's blocked read or write now (its thread then closes it).
    ``socket.socket.shutdown`` itself: a TLS socket's own would drop its SSL
    object under the thread still reading through it."""
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class LimitedReader:
    """A request's rfile while its request line and headers are read: at most
    ``limit`` bytes, then ``HeadersTooLarge``."""

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw = raw
        self.left = limit

    def readline(self, size: int = -1) -> bytes:
        want = self.left + 1 if size < 0 else min(size, self.left + 1)
        line: bytes = self.raw.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise HeadersTooLarge
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class HeadersTooLarge(Exception):
    pass
