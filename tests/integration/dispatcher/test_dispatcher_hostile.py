"""The front end under hostile clients (dispatcher.frontend): each attack runs
from its own loopback addresses (127.0.0.2 and up) against the daemon's TCP
port, bounded in connections and time, while a normal call from 127.0.0.1
is timed; it must be answered, and the attacker's connections must end
within the configured bounds (the daemon before: a trickling sender kept a
connection 200 s and more, 512 idle ones locked every caller out for 120 s,
500 bodies of 4 MiB - 1 took it to 2 GB, ``GET /`` in HTTP/0.9 and a body
that never comes held a connection 120 s with no answer)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from dispatcher_testlib import Daemon

from dispatcher import wire

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALL = wire.dumps_call("VDI.stat", {"dbg": "normal", "sr": "s", "vdi": "ok"})


def _port(d: Daemon) -> int:
    return int(str(d.url).rstrip("/").rsplit(":", 1)[1])


def _connect(d: Daemon, source: str, timeout: float = 30) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", _port(d)))
    return s


def _request(body: bytes = CALL, path: str = "/fake") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (
        path.encode(), len(body)
    ) + body


def normal_call(d: Daemon, source: str = "127.0.0.1") -> tuple[bytes, float]:
    """One VDI.stat over TCP from ``source``: the first line of the answer, seconds."""
    started = time.monotonic()
    with _connect(d, source, timeout=60) as s:
        s.sendall(_request())
        got = b""
        while b"\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.split(b"\r\n", 1)[0], time.monotonic() - started


def _ended(s: socket.socket, within: float) -> tuple[bytes, float]:
    """Read until the server closes ``s`` (or ``within`` s pass); what came, seconds."""
    started = time.monotonic()
    got = b""
    s.settimeout(0.5)
    while time.monotonic() - started < within:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got, time.monotonic() - started


@pytest.fixture
def attackers() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def test_a_trickling_sender_is_cut_at_the_request_deadline(
    start_in_mode: Callable[..., Daemon], attackers: list[socket.socket]
) -> None:
    d = start_in_mode("--request-timeout", "2")
    headers, body = _request().split(b"\r\n\r\n", 1)
    cut: dict[str, float] = {}

    def trickle(what: str, data: bytes) -> None:
        s = _connect(d, "127.0.0.2")
        attackers.append(s)
        started = time.monotonic()
        for byte in data[:40]:  # one byte every 0.5 s: 20 s at most
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            if _readable(s):  # answered (408) or closed
                break
            time.sleep(0.5)
        _got, _ = _ended(s, 5)
        cut[what] = time.monotonic() - started

    threads = [
        threading.Thread(target=trickle, args=("headers", headers)),
        threading.Thread(target=trickle, args=("body", headers + b"\r\n\r\n" + body)),
    ]
    for t in threads:
        t.start()
    time.sleep(1)
    line, took = normal_call(d)
    for t in threads:
        t.join(60)
    assert line == b"HTTP/1.1 200 OK", line
    print(f"normal call during the trickle: {took:.3f}s; trickles cut after {cut}")
    # cut at the 2 s deadline (+ the watchdog's tick and a loaded machine),
    # not after the 20 s the trickle would take
    assert set(cut) == {"headers", "body"} and max(cut.values()) < 12, cut


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


def test_idle_and_slow_connections_do_not_lock_callers_out(
    start_in_mode: Callable[..., Daemon], attackers: list[socket.socket]
) -> None:
    d = start_in_mode(
        "--max-connections", "24", "--max-reading", "6", "--max-per-client", "64",
        "--idle-timeout", "60", "--request-timeout", "60",
    )  # fmt: skip
    for i in range(24):  # every place taken by an idle connection
        attackers.append(_connect(d, "127.0.0.2"))
    time.sleep(0.3)
    line, took_idle = normal_call(d)  # the oldest idle one makes room
    assert line == b"HTTP/1.1 200 OK", line
    for s in attackers:
        s.close()
    attackers.clear()
    for i in range(24):  # every place taken by a slow sender
        s = _connect(d, f"127.0.0.{3 + i % 4}")
        attackers.append(s)
        with contextlib.suppress(OSError):
            s.sendall(b"POST /fake HTTP/1.1\r\n")
        time.sleep(0.02)
    time.sleep(0.3)
    line, took_slow = normal_call(d)
    assert line == b"HTTP/1.1 200 OK", line
    # at most --max-reading slow senders are still connected
    alive = sum(1 for s in attackers if not _readable(s))
    assert alive <= 6, alive
    print(f"normal call among idle connections: {took_idle:.3f}s, among slow ones: {took_slow:.3f}s")
    rc, err = d.stop()
    assert rc == 0 and "idle, to make room" in err and "still reading its request" in err


def test_one_client_cannot_take_every_connection(
    start_in_mode: Callable[..., Daemon], attackers: list[socket.socket]
) -> None:
    d = start_in_mode("--max-per-client", "4", "--request-timeout", "60")
    for _ in range(4):  # four requests begun, none finished: nothing to evict
        s = _connect(d, "127.0.0.2")
        s.sendall(b"POST /fake HTTP/1.1\r\n")
        attackers.append(s)
    time.sleep(0.3)
    fifth = _connect(d, "127.0.0.2")
    attackers.append(fifth)
    got, _took = _ended(fifth, 10)
    assert got.startswith(b"HTTP/1.1 503 Busy") and b"the most one client may" in got, got
    line, _ = normal_call(d)  # another address is served
    assert line == b"HTTP/1.1 200 OK", line


def test_bodies_in_flight_are_bounded_in_memory(
    start_in_mode: Callable[..., Daemon], attackers: list[socket.socket]
) -> None:
    """100 connections from 5 addresses each send all but the last byte of a
    4 MiB - 1 body: the daemon holds at most --max-inflight of them (16 MiB),
    refuses the rest at once (503, unread), and a normal call is served."""
    d = start_in_mode("--max-inflight", str(16 << 20), "--request-timeout", "30")
    proc = psutil.Process(d.proc.pid)
    before = proc.memory_info().rss
    length = (4 << 20) - 1
    chunk = b"<" * (1 << 20)
    refused = 0
    peak = before

    def attack(source: str, n: int, out: list[int]) -> None:
        for _ in range(n):
            s = _connect(d, source)
            attackers.append(s)
            try:
                s.sendall(b"POST /fake HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % length)
                sent = 0
                while sent < length - 1:
                    n_ = s.send(chunk[: min(len(chunk), length - 1 - sent)])
                    sent += n_
                    if _readable(s):
                        break
            except OSError:
                pass
            if _readable(s):
                with contextlib.suppress(OSError):
                    if s.recv(64).startswith(b"HTTP/1.1 503"):
                        out.append(1)

    out: list[int] = []
    threads = [
        threading.Thread(target=attack, args=(f"127.0.0.{2 + i}", 20, out)) for i in range(5)
    ]
    for t in threads:
        t.start()
    timings = []
    while any(t.is_alive() for t in threads):
        peak = max(peak, proc.memory_info().rss)
        line, took = normal_call(d)
        assert line == b"HTTP/1.1 200 OK", line
        timings.append(took)
        time.sleep(0.1)
    for t in threads:
        t.join()
    peak = max(peak, proc.memory_info().rss)
    refused = len(out)
    grew = (peak - before) >> 20
    print(f"RSS {before >> 20} MiB -> {peak >> 20} MiB; {refused} bodies refused; "
          f"normal calls {min(timings):.3f}-{max(timings):.3f}s")  # fmt: skip
    assert refused >= 80, refused  # at most 4 bodies of 4 MiB fit in 16 MiB
    assert grew < 100, grew  # unbounded: 100 x 4 MiB = 400 MiB


@pytest.mark.parametrize(
    ("what", "data", "half_close", "status"),
    [
        ("HTTP/0.9 GET", b"GET /\r\n", False, b"HTTP/1.1 400"),
        ("garbage line", b"\x16\x03\x01 hello\r\n", False, b"HTTP/1.1 400"),
        ("a body that ends early", _request()[:-10], True, b"HTTP/1.1 400"),
        ("a Content-Length with no body", _request().split(b"\r\n\r\n")[0] + b"\r\n\r\n",
         False, b"HTTP/1.1 408"),
        ("a request line with no end", b"GET /", False, b"HTTP/1.1 408"),
    ],
)  # fmt: skip
def test_a_malformed_request_is_answered(
    start_in_mode: Callable[..., Daemon],
    attackers: list[socket.socket],
    what: str,
    data: bytes,
    half_close: bool,
    status: bytes,
) -> None:
    """Malformed: answered at once; incomplete: at the request deadline (2 s
    here); never held with no answer (the daemon before: 120 s)."""
    d = start_in_mode("--request-timeout", "2")
    s = _connect(d, "127.0.0.2")
    attackers.append(s)
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    got, took = _ended(s, 20)
    first = got.split(b"\r\n", 1)[0]
    print(f"{what}: {first!r} after {took:.3f}s")
    assert got.startswith(status), (what, got)
    assert took < (1 if status.endswith(b"400") else 0) + 8, (what, took)
    line, _ = normal_call(d)
    assert line == b"HTTP/1.1 200 OK", line
