"""dispatcher.frontend's bookkeeping on socket pairs (no daemon): admission,
eviction of the oldest idle connection, per-client bounds, the bound on
connections reading, the deadlines the watchdog enforces, the body budget."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from dispatcher.frontend import BodyBudget, Frontend, Limits


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def _pair(pairs: list[tuple[socket.socket, socket.socket]]) -> socket.socket:
    a, b = socket.socketpair()
    pairs.append((a, b))
    return a


def _closed(s: socket.socket) -> bool:
    """Whether the server side ``s`` was shut down (reads end at once)."""
    s.settimeout(0)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_full_listener_evicts_its_oldest_idle_connection(pairs: list) -> None:
    fe = Frontend(Limits(max_connections=3, max_per_client=None, idle_timeout=60))
    conns = []
    for i in range(3):
        conns.append(fe.admit(_pair(pairs), ("10.0.0.1", i)))
        time.sleep(0.01)
    fe.set_state(conns[0], "busy")  # a running call is never evicted
    new = fe.admit(_pair(pairs), ("10.0.0.9", 9))
    assert new is not None and fe.evicted == 1
    assert not fe.alive(conns[1]) and fe.alive(conns[0]) and fe.alive(conns[2])
    assert _closed(conns[1].sock) and not _closed(conns[2].sock)
    for c in (conns[2], new):
        fe.set_state(c, "busy")
    assert fe.admit(_pair(pairs), ("10.0.0.9", 10)) is None  # nothing idle left: refused
    assert b"503 Busy" in fe.refusal(_pair(pairs), ("10.0.0.9", 10))
    fe.stop()


def test_per_client_bound(pairs: list) -> None:
    fe = Frontend(Limits(max_connections=100, max_per_client=2))
    a = [fe.admit(_pair(pairs), ("10.0.0.1", i)) for i in range(2)]
    for c in a:
        assert c is not None
        fe.set_state(c, "reading")
    assert fe.admit(_pair(pairs), ("10.0.0.1", 3)) is None
    assert b"the most one client may" in fe.refusal(_pair(pairs), ("10.0.0.1", 3))
    assert fe.admit(_pair(pairs), ("10.0.0.2", 1)) is not None
    fe.stop()


def test_the_longest_reader_goes_when_too_many_read(pairs: list) -> None:
    fe = Frontend(Limits(max_connections=100, max_reading=2, max_per_client=None))
    conns = [fe.admit(_pair(pairs), ("10.0.0.1", i)) for i in range(3)]
    for c in conns:
        assert c is not None
        fe.set_state(c, "reading")
        time.sleep(0.01)
    assert not fe.alive(conns[0]) and fe.alive(conns[1]) and fe.alive(conns[2])
    fe.stop()


def test_the_watchdog_answers_408_and_closes_at_the_deadline(pairs: list) -> None:
    fe = Frontend(Limits(request_timeout=0.3, idle_timeout=0.3, max_per_client=None))
    reading = fe.admit(_pair(pairs), ("10.0.0.1", 1))
    idle = fe.admit(_pair(pairs), ("10.0.0.1", 2))
    assert reading is not None and idle is not None
    fe.set_state(reading, "reading", b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    deadline = time.monotonic() + 10
    while (fe.alive(reading) or fe.alive(idle)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fe.alive(reading) and not fe.alive(idle)
    client = pairs[0][1]
    client.settimeout(5)
    assert client.recv(100).startswith(b"HTTP/1.1 408")
    assert fe.stats()["timed_out"] == 1  # the idle one is no timeout of a request
    fe.stop()


def test_body_budget() -> None:
    b = BodyBudget(max_inflight=16 << 20, max_body=4 << 20)
    assert b.reserve("x", 1000) and b.held == 0  # a small body: always, uncounted
    assert b.reserve("x", 4 << 20) and not b.reserve("x", 4 << 20)  # a quarter per client
    assert b.reserve("y", 4 << 20) and b.reserve("z", 4 << 20) and b.reserve("w", 4 << 20)
    assert not b.reserve("v", 4 << 20) and b.reserve("v", 60 << 10)  # full; small still in
    b.release("x", 4 << 20)
    assert b.reserve("v", 4 << 20) and b.refused == 2
