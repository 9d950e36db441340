#!/usr/bin/env python3
"""Benchmark of the dispatcher: warm (forked) plugin processes, executed ones, and the
plugin run directly, in one run, against the issue's targets.

Two daemons with the real ext plugin, each with its own SM_ROOT and default SR:
one forking calls from warm parents (the default), one executing every plugin
(``--no-warm``).  "direct" pipes the same request into the plugin executable
run by the package's interpreter (as an installed plugin runs; a
``#!/usr/bin/env python3`` through a version-manager shim costs more).

Table (medians of ``--calls`` calls, each through a kept-alive connection):

  Query.query, VDI.stat          latency (targets, warm: 3 ms, 5 ms)
  VDI.create, VDI.snapshot       latency (target, warm: 15 ms); a snapshot of a
                                 new VDI each time (created outside the timing)
  VDI.stat, 8 clients            calls/s on one SR for ``--seconds`` (target,
                                 warm: 200/s)
  SR.scan of ``--scan-vdis``     VDIs in snapshot trees (4 per tree, built
                                 in-process; target, warm: 400 ms)
  floor                          ``python -I -c 'import xmlrpc.client'``: the
                                 direct VDI.* target is 1.3x this.  For each
                                 direct figure the floor is also run in turn
                                 with it (one floor run before each call): the
                                 machine's speed drifts by a third within the
                                 hour, so a ratio compares samples taken
                                 together

Usage:
    .venv/bin/python bench/dispatcher_bench.py [--calls 40] [--seconds 5] [--scan-vdis 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the bench keeps its SRs in temporary directories: those are its SR roots
os.environ.setdefault("SM_SR_PATHS", tempfile.gettempdir())

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "lib"))
sys.path.insert(2, str(REPO / "bench"))

import benchd

from dispatcher import client, wire

EXTSR = REPO / "plugins" / "ext" / "EXTSR"
MiB = 1 << 20
SUCCESS = b"<name>Status</name><value>Success</value>"


class Daemon:
    def __init__(self, root: Path, warm: bool) -> None:
        self.root = root
        root.mkdir(parents=True)
        env = dict(os.environ, SM_ROOT=str(root), PYTHONUNBUFFERED="1")
        argv = [
            "--plugins-dir", str(REPO / "plugins"),
            "--default-sr", str(root / "default-sr"), "--log-file", str(root / "dispatcher.log"),
            *([] if warm else ["--no-warm"]),
        ]  # fmt: skip
        d = benchd.start(argv, env=env)
        d.need("sock", "sr")
        assert d.sock is not None and d.sr is not None
        self.proc, self.sock, self.sr = d.proc, d.sock, d.sr
        self.client = client.Client(self.sock, keep_alive=True)
        if warm:
            deadline = time.monotonic() + 120
            while not [w for w in self.call("Dispatcher.status", {})["warm"] if w["state"] == "ready"]:
                if time.monotonic() > deadline:
                    raise SystemExit("no warm parent became ready")
                time.sleep(0.1)

    def call(self, method: str, args: dict[str, Any], path: str = "/") -> Any:
        resp = self.client.call(method, {"dbg": "bench", **args}, path)
        if resp.status != "Success":
            raise SystemExit(f"{method} failed: {resp.error or resp.fault}")
        return resp.value["Value"]

    def post_raw(self, method: str, args: dict[str, Any]) -> bytes:
        """The response's bytes, checked for Success, not unmarshalled."""
        return _success(self.client.post("/", wire.dumps_call(method, {"dbg": "bench", **args})), method)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def direct(root: Path, method: str, args: dict[str, Any]) -> Callable[[], Any]:
    """A function running the plugin once on this request (the interpreter the package lives in)."""
    body = wire.dumps_call(method, {"dbg": "bench", **args})
    env = dict(os.environ, SM_ROOT=str(root))

    def run() -> Any:
        p = subprocess.run([sys.executable, str(EXTSR)], input=body, capture_output=True, env=env, check=True)
        resp = wire.parse_response(p.stdout)
        if resp.status != "Success":
            raise SystemExit(f"direct {method} failed: {resp.error}")
        return resp.value["Value"]

    return run


def _success(raw: bytes, method: str) -> bytes:
    if SUCCESS not in raw[:200]:
        raise SystemExit(f"{method} failed: {raw[:500]!r}")
    return raw


def direct_raw(root: Path, method: str, args: dict[str, Any]) -> Callable[[], bytes]:
    """The plugin run directly; its response's bytes, checked for Success."""
    body = wire.dumps_call(method, {"dbg": "bench", **args})
    env = dict(os.environ, SM_ROOT=str(root))
    return lambda: _success(
        subprocess.run([sys.executable, str(EXTSR)], input=body, capture_output=True, env=env, check=True).stdout,
        method,
    )


def floor_run() -> None:
    subprocess.run([sys.executable, "-I", "-c", "import xmlrpc.client"], check=True)


def alongside_floor(
    fn: Callable[[], Any], n: int, setup: Callable[[], Any] | None = None
) -> tuple[float, float]:
    """Medians (ms) of ``fn`` and of the floor, run in turn: floor, then ``fn``."""
    floors: list[float] = []

    def floor_first() -> None:
        if setup is not None:
            setup()
        t = time.perf_counter()
        floor_run()
        floors.append(time.perf_counter() - t)

    return median_ms(fn, n, floor_first), statistics.median(floors) * 1000


def median_ms(fn: Callable[[], Any], n: int, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(n):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def throughput(fn: Callable[[], Any], clients: int, seconds: float) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def worker(i: int, call: Callable[[], Any]) -> None:
        while time.monotonic() < stop:
            call()
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i, fn)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def per_client(d: Daemon, method: str, args: dict[str, Any]) -> Callable[[], Any]:
    """A call through its own connection per thread (a Client is not shared)."""
    local = threading.local()
    body = wire.dumps_call(method, {"dbg": "bench", **args})

    def call() -> Any:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = client.Client(d.sock, keep_alive=True)
        resp = wire.parse_response(c.post("/", body))
        if resp.status != "Success":
            raise SystemExit(f"{method} failed: {resp.error}")

    return call


def build_scan_sr(root: Path, n: int) -> tuple[str, Path]:
    """An SR directory holding ``n`` visible VDIs in snapshot trees, built in-process."""
    import plugin_bench

    build_root = root / "build"
    sr_dir = root / "scan-sr"
    sr_dir.mkdir(parents=True)
    driver = plugin_bench.load_driver(build_root)
    sr = "5ca11ab1-0000-4000-8000-000000010000"
    dc = {"path": str(sr_dir)}
    driver.sr_create(dbg="bench", sr=sr, device_config=dc, physical_size=0)
    driver.sr_attach(dbg="bench", sr=sr, device_config=dc)
    plugin_bench.build_trees(driver, sr, n)
    driver.sr_detach(dbg="bench", sr=sr)
    return sr, sr_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=40, help="calls per latency figure (40)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput figure (5)")
    p.add_argument("--clients", type=int, default=8, help="clients of the throughput figure (8)")
    p.add_argument("--scan-vdis", type=int, default=10000, help="VDIs of the SR.scan figure (10000; 0: skip)")
    args = p.parse_args()
    # As an installed package: bytecode compiled once and kept, whatever the caller's shell says.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "lib", "plugins", "dispatcher"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    daemons: list[Daemon] = []
    rows: list[tuple[str, str, list[float], str]] = []
    try:
        warm = Daemon(tmp / "warm", True)
        daemons.append(warm)
        execd = Daemon(tmp / "exec", False)
        daemons.append(execd)
        print(
            f"dispatcher bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, python "
            f"{sys.version.split()[0]} ({sys.executable}), {args.calls} calls per figure",
            flush=True,
        )
        floor = median_ms(floor_run, args.calls)
        floors: dict[str, float] = {}  # the floor run in turn with each direct figure
        rows.append(("floor: python -I -c 'import xmlrpc.client'", "ms", [floor, floor, floor], ""))
        targets = {"Query.query": "warm <= 3", "VDI.stat": "warm <= 5", "VDI.create": "warm <= 15",
                   "VDI.snapshot": "warm <= 15"}  # fmt: skip
        for method in ("Query.query", "VDI.stat", "VDI.create", "VDI.snapshot"):
            figures = []
            for d in (warm, execd, None):
                target = d or execd
                root = target.root
                vdi = target.call("VDI.create", {"sr": target.sr, "vdi_info": {"name_label": "s", "virtual_size": MiB}})["vdi"]
                made: dict[str, str] = {"vdi": vdi}

                def fresh(t: Daemon = target, m: dict[str, str] = made) -> None:
                    m["vdi"] = t.call("VDI.create", {"sr": t.sr, "vdi_info": {"name_label": "s", "virtual_size": MiB}})["vdi"]

                def request(
                    m: dict[str, str] = made, t: Daemon = target, meth: str = method
                ) -> tuple[dict[str, Any], str]:
                    if meth == "Query.query":
                        return {}, "/ext"
                    if meth == "VDI.stat":
                        return {"sr": t.sr, "vdi": m["vdi"]}, "/"
                    if meth == "VDI.create":
                        return {"sr": t.sr, "vdi_info": {"name_label": "c", "virtual_size": MiB}}, "/"
                    return {"sr": t.sr, "vdi_info": {"vdi": m["vdi"]}}, "/"

                setup = fresh if method == "VDI.snapshot" else None
                if d is None:
                    def one(r: Path = root, meth: str = method) -> Any:
                        a, _path = request()
                        return direct(r, meth, a)()
                else:
                    def one(dd: Daemon = d, meth: str = method) -> Any:
                        a, path = request()
                        return dd.call(meth, a, path)
                if d is None:
                    ms, floors[method] = alongside_floor(one, args.calls, setup)
                    figures.append(ms)
                else:
                    figures.append(median_ms(one, args.calls, setup))
            rows.append((method, "ms", figures, targets[method]))
        vdi = warm.call("VDI.create", {"sr": warm.sr, "vdi_info": {"name_label": "t", "virtual_size": MiB}})["vdi"]
        vdi_e = execd.call("VDI.create", {"sr": execd.sr, "vdi_info": {"name_label": "t", "virtual_size": MiB}})["vdi"]
        rates = [
            throughput(per_client(warm, "VDI.stat", {"sr": warm.sr, "vdi": vdi}), args.clients, args.seconds),
            throughput(per_client(execd, "VDI.stat", {"sr": execd.sr, "vdi": vdi_e}), args.clients, args.seconds),
            throughput(direct(execd.root, "VDI.stat", {"sr": execd.sr, "vdi": vdi_e}), args.clients, args.seconds),
        ]
        rows.append((f"VDI.stat, {args.clients} clients, one SR", "calls/s", rates, "warm >= 200"))
        if args.scan_vdis:
            sr, sr_dir = build_scan_sr(tmp, args.scan_vdis)
            dc = {"path": str(sr_dir)}
            for d in (warm, execd):
                d.call("SR.attach", {"sr": sr, "device_config": dc}, "/ext")
            # until the whole answer is received; the client's own unmarshalling
            # (xmlrpc-style, of an ~11 MB answer) is timed apart: it is not the call
            raw = warm.post_raw("SR.scan", {"sr": sr})
            t = time.perf_counter()
            n = len(wire.parse_response(raw).value["Value"])
            parse_ms = (time.perf_counter() - t) * 1000
            runs = max(5, args.calls // 4)
            scans = [
                median_ms(lambda: warm.post_raw("SR.scan", {"sr": sr}), runs),
                median_ms(lambda: execd.post_raw("SR.scan", {"sr": sr}), runs),
                median_ms(direct_raw(execd.root, "SR.scan", {"sr": sr}), runs),
            ]
            rows.append((f"SR.scan of {n} VDIs in snapshot trees", "ms", scans, "warm <= 400"))
            rows.append((f"  (client: unmarshal {len(raw) >> 20} MiB answer)", "ms", [parse_ms] * 3, "not in the figure above"))
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| {'figure':44s} | {'unit':7s} | {'warm':>9s} | {'exec':>9s} | {'direct':>9s} | target |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 11}|{'-' * 11}|{'-' * 11}|--------|")
    for name, unit, (w, e, dr), target in rows:
        print(f"| {name:44s} | {unit:7s} | {w:9.1f} | {e:9.1f} | {dr:9.1f} | {target} |")
    d_vdi = [r for r in rows if r[0].startswith("VDI.") and r[1] == "ms"]
    print("\ndirect VDI.* / the floor run in turn with it (target <= 1.3): "
          + ", ".join(f"{r[0]} {r[2][2] / floors[r[0]]:.2f} ({r[2][2]:.1f} / {floors[r[0]]:.1f} ms)"
                      for r in d_vdi))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
