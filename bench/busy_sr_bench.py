#!/usr/bin/env python3
"""Benchmark: calls/s on SR B while SR A is busy, against calls/s on B alone (same run).

"A busy" is what a long operation does to an SR: something holds A's lock (the
bench holds it, as a long copy or coalesce would) and calls to A pile up, each
plugin waiting for the lock (the daemon runs with SM_LOCK_TIMEOUT=600 so they
keep waiting).  Meanwhile ``--clients`` threads call VDI.stat on SR B, through
the daemon, for ``--seconds``.  The peer is the same load on B with A idle.

Printed for the dispatcher as it is (at most ``share`` slots per SR, the
default: all but a quarter of ``--workers``) and with ``--share`` equal to
``--workers`` (one SR may take every slot, as before per-SR shares), each as
B's calls/s, its ratio to B alone (target >= 0.8) and B's failures
(DISPATCHER_BUSY).  Usage:

    .venv/bin/python bench/busy_sr_bench.py [--seconds 8] [--clients 4] [--busy 24]
"""

from __future__ import annotations

import argparse
import os
import signal
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
sys.path.insert(2, str(REPO / "bench"))

import benchd
from smcommon.engine import locks

from dispatcher import client, wire


def start_daemon(root: Path, workers: int, share: int | None) -> tuple[subprocess.Popen[str], str, Path]:
    env = dict(os.environ, SM_ROOT=str(root), PYTHONUNBUFFERED="1", SM_LOCK_TIMEOUT="600")
    argv = [
        "--plugins-dir", str(REPO / "plugins"),
        "--workers", str(workers), "--queue-timeout", "30",
        "--default-sr", str(root / "sr-a"), "--log-file", str(root / "dispatcher.log"),
    ]  # fmt: skip
    if share:
        argv += ["--share", str(share)]
    d = benchd.start(argv, env=env)
    d.need("sock", "sr")
    assert d.sock is not None and d.sr is not None
    return d.proc, d.sr, d.sock


def ok(resp: wire.Response) -> object:
    if resp.status != "Success":
        raise RuntimeError(f"call failed: {resp.error or resp.fault}")
    return resp.value["Value"]


def rate(sock: Path, body: bytes, clients: int, seconds: float) -> tuple[float, int]:
    """Calls/s of ``body`` with ``clients`` threads, and the calls that failed."""
    stop = time.monotonic() + seconds
    counts = [0] * clients
    failed = [0] * clients

    def worker(i: int) -> None:
        c = client.Client(sock, keep_alive=True)
        while time.monotonic() < stop:
            if wire.parse_response(c.post("/", body)).status == "Success":
                counts[i] += 1
            else:
                failed[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0), sum(failed)


def run(args: argparse.Namespace, share: int | None, label: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="busy-sr-bench-") as tmp:
        root = Path(tmp)
        proc, sr_a, sock = start_daemon(root, args.workers, share)
        try:
            c = client.Client(sock)
            sr_b = "b0000000-0000-4000-8000-00000000000b"
            (root / "sr-b").mkdir()
            dc = {"path": str(root / "sr-b")}
            ok(c.call("SR.create", {"dbg": "b", "sr": sr_b, "device_config": dc, "physical_size": 0}, "/ext"))
            ok(c.call("SR.attach", {"dbg": "b", "sr": sr_b, "device_config": dc}, "/ext"))
            vdi = ok(c.call("VDI.create", {"dbg": "b", "sr": sr_b, "vdi_info": {"name_label": "b", "virtual_size": 1 << 20}}))
            assert isinstance(vdi, dict)
            body = wire.dumps_call("VDI.stat", {"dbg": "bench", "sr": sr_b, "vdi": vdi["vdi"]})
            rate(sock, body, args.clients, 1.0)  # warm the page cache
            alone, _ = rate(sock, body, args.clients, args.seconds)

            held = locks.tree_lock(locks.shared_lock_dir(root / "sr-a"), timeout=5)
            held.acquire()
            busy_body = wire.dumps_call(
                "VDI.create", {"dbg": "busy", "sr": sr_a, "vdi_info": {"name_label": "a", "virtual_size": 1 << 20}}
            )
            pilers = []
            for _ in range(args.busy):
                t = threading.Thread(target=lambda: client.Client(sock).post("/", busy_body), daemon=True)
                t.start()
                pilers.append(t)
            # let A's calls take what they can take, and their plugins start
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = ok(c.call("Dispatcher.status", {"dbg": "b"}))
                assert isinstance(st, dict)
                if st["busy"] + st["waiting"] >= min(args.busy, args.workers):
                    break
                time.sleep(0.1)
            time.sleep(1.5)
            busy, failed = rate(sock, body, args.clients, args.seconds)
            st = ok(c.call("Dispatcher.status", {"dbg": "b"}))
            assert isinstance(st, dict)
            held.release()
            a_slots = [q["running"] for q in st["queues"] if q["key"] == sr_a]
            print(
                f"  {label:34s} B alone {alone:6.1f} calls/s   B while A busy {busy:6.1f} calls/s"
                f"   ratio {busy / alone:5.2f}   B failed {failed}   A held {a_slots[0] if a_slots else 0}"
                f"/{st['workers']} slots"
            )
            return alone, busy
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per measurement (8)")
    p.add_argument("--clients", type=int, default=4, help="threads calling SR B (4)")
    p.add_argument("--busy", type=int, default=24, help="calls piled on SR A (24)")
    p.add_argument("--workers", type=int, default=16, help="the daemon's --workers (16)")
    p.add_argument("--runs", type=int, default=3, help="runs of each (3); medians are printed")
    args = p.parse_args()
    print(
        f"busy SR bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, VDI.stat on SR B, "
        f"{args.clients} clients, {args.busy} calls waiting on SR A's lock, {args.seconds:g}s each"
    )
    results: dict[str, list[tuple[float, float]]] = {"shared": [], "unshared": []}
    for _ in range(args.runs):
        results["shared"].append(run(args, None, "per-SR share (default)"))
        results["unshared"].append(run(args, args.workers, f"--share {args.workers} (no per-SR bound)"))
    for key, label in (("shared", "per-SR share (default)"), ("unshared", "no per-SR bound")):
        ratios = [b / a for a, b in results[key]]
        print(f"median ratio, {label}: {statistics.median(ratios):.2f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
