#!/usr/bin/env python3
"""Per-call cost of NFSSR against EXTSR, and how fast calls fail on a dead server.

Starts nfs-ganesha in a network namespace (the tests' fixture,
tests/integration/nfs/nfs_server.py; root), then prints medians of ``--runs``
runs measured in this run:

  calls   Query.query, SR.scan, VDI.create, VDI.snapshot, VDI.stat through
          NFSSR (an NFSv3 and an NFSv4.1 SR on the server) and through EXTSR
          (a ``path`` SR), with the ratio NFSSR / EXTSR.  NFSSR's calls on
          an attached SR include its probe of the server (one rpcinfo).
  attach  SR.attach + SR.detach of each (NFSSR: probe, nfs-ls, mount)
  dead    the time for a call to fail: SR.create against a dead host (an
          unused address of the server's subnet), a closed port, a missing
          export; VDI.stat on an attached SR whose server was stopped, and
          whose server is frozen (SIGSTOP).  Target < 10 s; the reference
          implementation's mount.nfs retries for ~125 s, and hard mounts hang.

On this machine the kernel has no NFS client, so NFSSR runs its development
mount (the NFS talk for real, then a bind mount): the mount itself is cheaper
than a kernel NFS mount, everything else (probe, listings) is real.

    .venv/bin/python bench/nfs_bench.py
    .venv/bin/python bench/nfs_bench.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from pathlib import Path
from typing import Any

# the bench keeps its SRs in temporary directories: those are its SR roots
os.environ.setdefault("SM_SR_PATHS", tempfile.gettempdir())

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration" / "nfs"))

from nfs_server import NfsServer, dev_env, missing_tools

EXTSR = REPO / "plugins" / "ext" / "EXTSR"
NFSSR = REPO / "plugins" / "nfs" / "NFSSR"


class Host:
    def __init__(self, root: Path, plugin: Path, env: dict[str, str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.plugin = plugin
        self.env = {**os.environ, **env, "SM_ROOT": str(root)}

    def call(self, method: str, must: bool = True, **args: Any) -> tuple[float, Any]:
        args.setdefault("dbg", "bench")
        req = xmlrpc.client.dumps((args,), methodname=method)
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, str(self.plugin)], input=req, capture_output=True,
            text=True, env=self.env, check=False, timeout=600,
        )  # fmt: skip
        dt = time.perf_counter() - t0
        (body,), _ = xmlrpc.client.loads(p.stdout)
        if must and body.get("Status") != "Success":
            raise SystemExit(f"{self.plugin.name} {method} failed: {body.get('ErrorDescription')}")
        return dt, body.get("Value", body.get("ErrorDescription"))


def median_of(runs: int, fn: Any) -> float:
    fn()
    return statistics.median(fn() for _ in range(runs))


CALLS = ["Query.query", "SR.scan", "VDI.stat", "VDI.create", "VDI.snapshot"]


def interleaved(hosts: dict[str, tuple[Host, str]], runs: int) -> dict[str, dict[str, float]]:
    """Median per call and per host, the hosts' calls interleaved (one of each
    in turn), so that load from elsewhere weighs on every side alike."""
    vdis = {
        name: host.call("VDI.create", sr=sr, vdi_info={"name_label": "b", "virtual_size": str(8 << 20)})[1]["vdi"]
        for name, (host, sr) in hosts.items()
    }
    info = {"name_label": "c", "virtual_size": str(8 << 20)}

    def one(call: str, name: str) -> float:
        host, sr = hosts[name]
        if call == "Query.query":
            return host.call(call)[0]
        if call == "SR.scan":
            return host.call(call, sr=sr)[0]
        if call == "VDI.stat":
            return host.call(call, sr=sr, vdi=vdis[name])[0]
        if call == "VDI.create":
            return host.call(call, sr=sr, vdi_info=info)[0]
        return host.call(call, sr=sr, vdi_info={"vdi": vdis[name]})[0]

    out: dict[str, dict[str, float]] = {name: {} for name in hosts}
    for call in CALLS:
        samples: dict[str, list[float]] = {name: [] for name in hosts}
        for i in range(runs + 1):
            order = list(hosts) if i % 2 else list(reversed(hosts))
            for name in order:
                t = one(call, name)
                if i:  # the first round warms up
                    samples[name].append(t)
        for name in hosts:
            out[name][call] = statistics.median(samples[name])
    return out


def attach_cycle(host: Host, sr: str, config: dict[str, str], runs: int) -> float:
    def once() -> float:
        t = host.call("SR.detach", sr=sr)[0]
        return t + host.call("SR.attach", sr=sr, device_config=config)[0]

    return median_of(runs, once)


def make_sr(host: Host, config: dict[str, str]) -> str:
    sr = str(uuid.uuid4())
    host.call("SR.create", sr=sr, device_config=config, physical_size="0")
    host.call("SR.attach", sr=sr, device_config=config)
    return sr


def failure(host: Host, method: str, **args: Any) -> tuple[float, str]:
    dt, err = host.call(method, must=False, **args)
    return dt, " ".join(err[:2]) if isinstance(err, list) else str(err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    if os.geteuid() != 0 or missing_tools():
        raise SystemExit(f"needs root and {missing_tools() or 'the NFS tools'} (scripts/setup)")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; runs={a.runs}")
    with tempfile.TemporaryDirectory(prefix="nfs-bench-") as tmp_s:
        tmp = Path(tmp_s)
        server = NfsServer(tmp / "server").start()
        try:
            env = dev_env(server, tmp)
            nfs = Host(tmp / "nfs-root", NFSSR, env)
            ext = Host(tmp / "ext-root", EXTSR, {})
            (tmp / "ext-sr").mkdir()
            ext_cfg = {"path": str(tmp / "ext-sr")}
            cfgs = {
                "NFSSR v3": {"server": server.address, "serverpath": "/export", "nfsversion": "3"},
                "NFSSR v4.1": {"server": server.address, "serverpath": "/export", "nfsversion": "4.1"},
            }
            ext_sr = make_sr(ext, ext_cfg)
            srs = {name: make_sr(nfs, cfg) for name, cfg in cfgs.items()}
            hosts = {"EXTSR": (ext, ext_sr), **{name: (nfs, sr) for name, sr in srs.items()}}
            results = interleaved(hosts, a.runs)
            results["EXTSR"]["SR.detach+SR.attach"] = attach_cycle(ext, ext_sr, ext_cfg, a.runs)
            for name, cfg in cfgs.items():
                results[name]["SR.detach+SR.attach"] = attach_cycle(nfs, srs[name], cfg, a.runs)
            print(f"\n{'call':<22}{'EXTSR':>10}" + "".join(f"{k:>14}{'ratio':>7}" for k in cfgs))
            for call, b in results["EXTSR"].items():
                row = f"{call:<22}{b * 1000:>8.1f}ms"
                for name in cfgs:
                    v = results[name][call]
                    row += f"{v * 1000:>12.1f}ms{v / b:>7.2f}"
                print(row)

            print("\ntime for a call to fail (target < 10 s; reference mount.nfs: ~125 s)")
            cases = [
                ("SR.create, dead host", nfs, "SR.create", {"sr": str(uuid.uuid4()), "physical_size": "0",
                 "device_config": {**cfgs["NFSSR v3"], "server": server.dead_address}}),
                ("SR.create, closed port", nfs, "SR.create", {"sr": str(uuid.uuid4()), "physical_size": "0",
                 "device_config": {**cfgs["NFSSR v4.1"], "port": "2050"}}),
                ("SR.create, no export", nfs, "SR.create", {"sr": str(uuid.uuid4()), "physical_size": "0",
                 "device_config": {**cfgs["NFSSR v3"], "serverpath": "/nope"}}),
            ]  # fmt: skip
            for label, host, method, args in cases:
                dt, what = failure(host, method, **args)
                print(f"  {label:<40}{dt:>7.2f}s  {what}")
            vdi = nfs.call("VDI.create", sr=srs["NFSSR v3"], vdi_info={"name_label": "x", "virtual_size": "1048576"})[1]["vdi"]
            server.stop_nfs()
            dt, what = failure(nfs, "VDI.stat", sr=srs["NFSSR v3"], vdi=vdi)
            print(f"  {'VDI.stat, NFS server stopped (v3)':<40}{dt:>7.2f}s  {what}")
            dt, what = failure(nfs, "VDI.stat", sr=srs["NFSSR v4.1"], vdi=vdi)
            print(f"  {'VDI.stat, NFS server stopped (v4.1)':<40}{dt:>7.2f}s  {what}")
            server.start_nfs()
            server.pause()
            dt, what = failure(nfs, "VDI.stat", sr=srs["NFSSR v4.1"], vdi=vdi)
            server.resume()
            print(f"  {'VDI.stat, NFS server frozen (v4.1)':<40}{dt:>7.2f}s  {what}")
            for sr in srs.values():
                nfs.call("SR.detach", sr=sr)
            ext.call("SR.detach", sr=ext_sr)
        finally:
            server.close()


if __name__ == "__main__":
    main()
