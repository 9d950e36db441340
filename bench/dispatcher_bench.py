#!/usr/bin/env python3
"""Benchmark of the dispatcher, against running the plugin directly, in one run.

Measures:
1. Added latency per call (aim: < 5 ms median), over a kept-alive connection: VDI.stat through the daemon
   over its Unix socket vs the same request piped into the plugin process
   (what the dispatcher itself does), interleaved call by call.  Done twice:
   with the real ext plugin, and with a minimal shell plugin (NULLSR, a
   canned answer) whose tiny, steady start-up lets the dispatcher's own cost
   show through the noise of Python start-up.
2. Throughput of VDI.stat on one ext SR with 8 and 32 concurrent clients:
   through the daemon vs the same number of threads running the plugin
   directly.

Prints medians (and p90) and the ratios.  Usage:
    python3 bench/dispatcher_bench.py [--calls 40] [--seconds 8]
Needs nothing but the repo (the daemon runs under a tmp SM_ROOT).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "lib"))

from dispatcher import client, wire


def start_daemon(
    root: Path, plugins: Path, workers: int
) -> tuple[subprocess.Popen[str], str, Path]:
    env = dict(os.environ, SM_ROOT=str(root), PYTHONUNBUFFERED="1")
    argv = [
        sys.executable,
        "-m",
        "dispatcher",
        "--plugins-dir",
        str(plugins),
        "--workers",
        str(workers),
    ]
    argv += [
        "--default-sr",
        str(root / "default-sr"),
        "--log-file",
        str(root / "dispatcher.log"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    banner = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        banner += line
        if line.startswith("  python:"):
            break
    sock = re.search(r"unix socket: (\S+)", banner)
    sr = re.search(r"default SR: (\S+)", banner)
    if not sock or not sr:
        proc.kill()
        raise SystemExit(f"the daemon did not start:\n{banner}")
    return proc, sr.group(1), Path(sock.group(1))


def direct(exe: Path, body: bytes, env: dict[str, str]) -> bytes:
    r = subprocess.run([str(exe)], input=body, capture_output=True, env=env, check=True)
    return r.stdout


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def med(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[int(len(xs) * 0.9) - 1] if len(xs) >= 10 else xs[-1]
    return f"median {statistics.median(xs) * 1000:8.2f} ms  p90 {p90 * 1000:8.2f} ms"


def latency(
    name: str,
    exe: Path,
    route: str,
    body: bytes,
    sock: Path,
    env: dict[str, str],
    n: int,
) -> None:
    c = client.Client(sock, keep_alive=True)
    assert wire.parse_response(c.post(route, body)).status == "Success", (
        f"{name}: the call fails"
    )
    d_times, v_times = [], []
    for _ in range(n):
        d_times.append(timed(lambda: direct(exe, body, env)))
        v_times.append(timed(lambda: c.post(route, body)))
    d, v = statistics.median(d_times), statistics.median(v_times)
    paired = statistics.median(b - a for a, b in zip(d_times, v_times))
    print(f"  {name:6s} direct:     {med(d_times)}")
    print(f"  {name:6s} dispatcher: {med(v_times)}")
    print(
        f"  {name:6s} added latency: {(v - d) * 1000:.2f} ms (difference of medians), "
        f"{paired * 1000:.2f} ms (median of paired differences); ratio {v / d:.3f}"
    )


def floor(sock: Path, n: int) -> None:
    """The dispatcher's own cost: a call it answers itself (no plugin)."""
    c = client.Client(sock, keep_alive=True)
    body = wire.dumps_call("Dispatcher.status", {"dbg": "bench"})
    times = [timed(lambda: c.post("/", body)) for _ in range(n)]
    print(f"  no plugin (Dispatcher.status round trip): {med(times)}")


def throughput(clients: int, seconds: float, call: object) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * clients
    errors: list[str] = []

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            try:
                call()  # type: ignore[operator]
            except Exception as e:  # noqa: BLE001 -- counted and shown
                errors.append(repr(e))
                return
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        print(f"    errors: {errors[:3]}")
    return sum(counts) / elapsed


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--calls", type=int, default=40, help="calls per latency measurement (40)"
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=8.0,
        help="seconds per throughput measurement (8)",
    )
    p.add_argument(
        "--workers", type=int, default=16, help="the daemon's --workers (16)"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        root = Path(tmp) / "root"
        plugins = Path(tmp) / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "ext").symlink_to(REPO / "plugins" / "ext")
        canned = Path(tmp) / "canned.xml"
        canned.write_bytes(
            wire.dumps_response(wire.success({"vdi": "v", "virtual_size": 1 << 20}))
        )
        null = plugins / "NULLSR"
        null.write_text(f"#!/bin/sh\ncat >/dev/null\nexec cat {canned}\n")
        null.chmod(0o755)
        proc, sr, sock = start_daemon(root, plugins, args.workers)
        env = dict(os.environ, SM_ROOT=str(root))
        try:
            c = client.Client(sock)
            made = c.call(
                "VDI.create",
                {
                    "dbg": "bench",
                    "sr": sr,
                    "vdi_info": {"name_label": "b", "virtual_size": 1 << 30},
                },
            )
            vdi = made.value["Value"]["vdi"]
            body = wire.dumps_call("VDI.stat", {"dbg": "bench", "sr": sr, "vdi": vdi})
            print(
                f"dispatcher bench: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, {args.calls} calls each"
            )
            print(
                "1. latency of VDI.stat, interleaved (peer: the same request piped into the plugin)"
            )
            floor(sock, args.calls)
            latency("null", null, "/null", body, sock, env, args.calls)
            latency(
                "ext",
                REPO / "plugins" / "ext" / "EXTSR",
                "/",
                body,
                sock,
                env,
                args.calls,
            )
            print(
                f"2. throughput of VDI.stat on one ext SR, {args.seconds:g}s each (daemon --workers {args.workers})"
            )
            exe = REPO / "plugins" / "ext" / "EXTSR"
            for n in (8, 32):
                d = throughput(n, args.seconds, lambda: direct(exe, body, env))
                v = throughput(
                    n, args.seconds, lambda: client.Client(sock).post("/", body)
                )
                print(
                    f"  {n:2d} clients: direct {d:7.1f} calls/s   dispatcher {v:7.1f} calls/s   ratio {v / d:.3f}"
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
