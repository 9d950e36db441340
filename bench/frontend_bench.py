#!/usr/bin/env python3
"""The dispatcher's front end under hostile clients: a normal call's latency
during each attack against the same call with no attack, same run.

Starts one dispatcher (fake-free: the real ext plugin, its default SR) with
TCP on 127.0.0.1 (``--insecure``: the bounds are the same with TLS) and its
defaults (--max-connections 512, --request-timeout 20, --max-inflight 64 MiB).
Each attack comes from loopback addresses 127.0.0.2 and up, bounded in
connections and time, and stops by itself:

  quiet     no attack (the peer of every line)
  idle      512 connections that send nothing (before: 503 for every caller, 120 s)
  trickle   200 senders of one byte every 0.5 s (before: held 200 s and more)
  bodies    500 connections each sending 4 MiB - 1 bytes but the last (before: 2 GB RSS)

For each it prints the median of ``--calls`` Query.query calls (over TCP from
127.0.0.1), the ratio to quiet, and the daemon's peak RSS; then how long a
trickler keeps its connection, and how fast ``GET /`` (HTTP/0.9) and a body
cut short are answered.

    python3 bench/frontend_bench.py [--calls 20] [--repo DIR]

``--repo DIR`` runs the dispatcher of another checkout (e.g. an export of an
earlier commit, ``git archive``) under the same attacks: the "before" figures.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the bench keeps its SRs in temporary directories: those are its SR roots
os.environ.setdefault("SM_SR_PATHS", tempfile.gettempdir())

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "lib"))

import benchd
import psutil

from dispatcher import wire

CALL = wire.dumps_call("Query.query", {"dbg": "bench"})


def start(base: Path, repo: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", SM_ROOT=str(base / "root"),
               PYTHONPATH=f"{repo / 'lib'}:{repo}", PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    helptext = subprocess.run([sys.executable, "-m", "dispatcher", "--help"], env=env,
                              cwd=repo, capture_output=True, text=True, check=False).stdout  # fmt: skip
    argv = [
        "--plugins-dir", str(repo / "plugins"),
        "--tcp", "127.0.0.1:0", *(["--insecure"] if "--insecure" in helptext else []),
        "--default-sr", str(base / "sr"),
    ]  # fmt: skip
    d = benchd.start(argv, env=env, cwd=repo, stderr=subprocess.DEVNULL)
    d.need("url")
    m = re.match(r"http://127\.0\.0\.1:(\d+)/", d.url or "")
    if not m:
        d.proc.kill()
        raise SystemExit(f"the dispatcher did not start on plain TCP:\n{d.banner}")
    return d.proc, int(m.group(1))


def connect(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.settimeout(30)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def call(port: int) -> float:
    started = time.monotonic()
    with connect(port, "127.0.0.1") as s:
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(CALL) + CALL)
        got = b""
        while b"</methodResponse>" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        return float("nan")
    return time.monotonic() - started


def measure(port: int, n: int, proc: psutil.Process) -> tuple[float, int, int]:
    """Median seconds of n calls, failures, peak RSS (bytes)."""
    times, peak = [], proc.memory_info().rss
    for _ in range(n):
        times.append(call(port))
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.05)
    good = [t for t in times if not math.isnan(t)]
    return (statistics.median(good) if good else float("nan")), len(times) - len(good), peak


def idle(port: int, stop: threading.Event, socks: list[socket.socket]) -> None:
    for i in range(512):
        with contextlib.suppress(OSError):
            socks.append(connect(port, f"127.0.0.{2 + i // 64}"))
    stop.wait(60)


def trickle(port: int, stop: threading.Event, socks: list[socket.socket]) -> None:
    mine = []
    for i in range(200):
        with contextlib.suppress(OSError):
            s = connect(port, f"127.0.0.{2 + i // 50}")
            s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
            mine.append(s)
    socks.extend(mine)
    for _ in range(120):
        if stop.wait(0.5):
            break
        for s in mine:
            with contextlib.suppress(OSError):
                s.send(b"<")


def bodies(port: int, stop: threading.Event, socks: list[socket.socket]) -> None:
    length = (4 << 20) - 1
    chunk = b"<" * (1 << 20)

    def one(source: str) -> None:
        for _ in range(50):
            if stop.is_set():
                return
            try:
                s = connect(port, source)
                socks.append(s)
                s.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % length)
                sent = 0
                while sent < length - 1:
                    sent += s.send(chunk[: min(len(chunk), length - 1 - sent)])
            except OSError:
                pass

    threads = [threading.Thread(target=one, args=(f"127.0.0.{2 + i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.wait(60)


def held(port: int) -> float:
    """Seconds a one-byte-every-0.5-s sender keeps its connection (60 s at most)."""
    s = connect(port, "127.0.0.20")
    s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10000\r\n\r\n")
    started = time.monotonic()
    s.settimeout(0.5)
    while time.monotonic() - started < 60:
        try:
            if s.recv(4096) == b"":
                break
            break
        except TimeoutError:
            with contextlib.suppress(OSError):
                s.send(b"<")
        except OSError:
            break
    s.close()
    return time.monotonic() - started


def answered(port: int, data: bytes, half_close: bool) -> tuple[str, float]:
    s = connect(port, "127.0.0.21")
    s.settimeout(150)
    started = time.monotonic()
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    try:
        first = s.recv(4096).split(b"\r\n", 1)[0].decode() or "(closed, no answer)"
    except OSError as e:
        first = str(e)
    s.close()
    return first, time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repo", type=Path, default=REPO, help="whose dispatcher (default: this one)")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="frontend-bench-") as tmp:
        proc, port = start(Path(tmp), ns.repo.resolve())
        print(f"dispatcher of {ns.repo.resolve()}")
        ps = psutil.Process(proc.pid)
        try:
            call(port)  # warm up
            results = {}
            for name, attack in (("quiet", None), ("idle", idle), ("trickle", trickle),
                                 ("bodies", bodies)):  # fmt: skip
                stop = threading.Event()
                socks: list[socket.socket] = []
                t = None
                if attack is not None:
                    t = threading.Thread(target=attack, args=(port, stop, socks))
                    t.start()
                    time.sleep(3)  # let it take hold
                results[name] = measure(port, ns.calls, ps)
                stop.set()
                if t is not None:
                    t.join()
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.close()
                time.sleep(1)
            quiet = results["quiet"][0]
            print(f"normal Query.query over TCP, median of {ns.calls}, during each attack:")
            for name, (med, failed, peak) in results.items():
                print(f"  {name:8s} {med * 1000:8.1f} ms  x{med / quiet:5.2f}  failed {failed:2d}"
                      f"  daemon peak RSS {peak >> 20} MiB")  # fmt: skip
            print(f"a sender of one byte every 0.5 s keeps its connection {held(port):.1f} s "
                  "(--request-timeout 20)")  # fmt: skip
            for what, data, half in (
                ("GET / (HTTP/0.9)", b"GET /\r\n", False),
                ("a body cut short", b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n<", True),
            ):
                first, took = answered(port, data, half)
                print(f"{what}: {first!r} in {took * 1000:.1f} ms")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
