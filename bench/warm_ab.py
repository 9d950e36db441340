#!/usr/bin/env python3
"""Warm dispatch of two checkouts, alternating: which one answers sooner.

This machine's speed drifts by a third within an hour, so figures of two
bench runs minutes apart do not compare.  This script starts a daemon of each
checkout in turn (its own dispatcher, plugins and library: ``PYTHONPATH``),
``--rounds`` times, and in each: ``--calls`` back-to-back Query.query and
VDI.stat calls through one kept-alive connection (latency), then VDI.stat
from 8 clients for ``--seconds`` (calls/s).  It prints the medians over the
rounds of each checkout's per-round medians, and the ratios.

Usage:
    .venv/bin/python bench/warm_ab.py OLD_CHECKOUT [NEW_CHECKOUT (this one)] [--rounds 3]

An old checkout: ``git worktree add /tmp/old <rev>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchd

REPO = benchd.REPO
sys.path.insert(0, str(REPO))

from dispatcher import client


def one_round(repo: Path, calls: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="warm-ab-") as tmp:
        root = Path(tmp)
        env = dict(os.environ, SM_ROOT=str(root), PYTHONUNBUFFERED="1",
                   PYTHONPATH=f"{repo / 'lib'}:{repo}", SM_SR_PATHS=tmp)  # fmt: skip
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode kept
        d = benchd.start(
            ["--plugins-dir", str(repo / "plugins"), "--default-sr", str(root / "sr"),
             "--log-file", str(root / "dispatcher.log")],
            env=env, cwd=repo,
        )  # fmt: skip
        d.need("sock", "sr")
        assert d.sock is not None and d.sr is not None
        sock, sr = d.sock, d.sr
        try:
            c = client.Client(sock, keep_alive=True)

            def call(cl: client.Client, method: str, args: dict[str, Any], path: str = "/") -> Any:
                r = cl.call(method, {"dbg": "ab", **args}, path)
                if r.status != "Success":
                    raise SystemExit(f"{repo}: {method} failed: {r.error or r.fault}")
                return r.value["Value"]

            deadline = time.monotonic() + 120
            while not [w for w in call(c, "Dispatcher.status", {})["warm"] if w["state"] == "ready"]:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{repo}: no warm parent became ready")
                time.sleep(0.1)
            info = {"name_label": "ab", "virtual_size": 1 << 20}
            vdi = call(c, "VDI.create", {"sr": sr, "vdi_info": info})["vdi"]
            stat = {"sr": sr, "vdi": vdi}
            out: dict[str, float] = {}
            for name, method, args, path in (
                ("Query.query ms", "Query.query", {}, "/ext"),
                ("VDI.stat ms", "VDI.stat", stat, "/"),
            ):
                for _ in range(5):
                    call(c, method, args, path)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    call(c, method, args, path)
                    times.append((time.perf_counter() - t0) * 1e3)
                out[name] = statistics.median(times)
            counts = [0] * 8
            stop = time.monotonic() + seconds

            def run(i: int) -> None:
                cl = client.Client(sock, keep_alive=True)
                while time.monotonic() < stop:
                    call(cl, "VDI.stat", stat)
                    counts[i] += 1

            threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["VDI.stat calls/s, 8 clients"] = sum(counts) / (time.monotonic() - t0)
            return out
        finally:
            d.proc.terminate()
            d.proc.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=REPO)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    repos = [a.old.resolve(), a.new.resolve()]
    got: dict[Path, list[dict[str, float]]] = {r: [] for r in repos}
    for n in range(a.rounds):
        for r in repos:
            got[r].append(one_round(r, a.calls, a.seconds))
            print(f"round {n + 1} {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in got[r][-1].items()),
                  flush=True)  # fmt: skip
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    print(f"| figure | {repos[0]} | {repos[1]} | new / old |")
    print("|---|---|---|---|")
    for key in got[repos[0]][0]:
        old, new = (statistics.median(x[key] for x in got[r]) for r in repos)
        print(f"| {key} | {old:.1f} | {new:.1f} | {new / old:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
