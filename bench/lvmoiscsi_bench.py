#!/usr/bin/env python3
"""LVMoISCSISR against EXTSR on the same machine: latency and lvm commands per call.

Starts a real iSCSI target (tgtd on 127.0.0.1, a sparse file-backed LUN with
CHAP), creates an lvmoiscsi SR on it (on this kernel: the userspace initiator
and loop activation) and an ext SR on a directory, then prints for each of

  VDI.create     a new 8 MiB VDI
  VDI.snapshot   a snapshot of a VDI with a block written
  SR.scan        an SR holding ``--scan-vdis`` VDIs (made in-process through
                 each plugin's driver, which is quicker than a process each)
  VDI.activate   attach + activate + deactivate + detach of a VDI (RW)

the median of ``--runs`` runs of the real executables for both types, the
ratio lvmoiscsi / ext, and the lvm commands each lvmoiscsi call ran (read
from its log lines by the call's dbg).  lvm commands cost 40-90 ms each here.

    sudo .venv/bin/python bench/lvmoiscsi_bench.py
    sudo .venv/bin/python bench/lvmoiscsi_bench.py --runs 5 --scan-vdis 100
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration" / "lvmoiscsi"))
PLUGINS = {"lvmoiscsi": REPO / "plugins" / "lvmoiscsi" / "LVMoISCSISR",
           "ext": REPO / "plugins" / "ext" / "EXTSR"}
MiB = 1024 * 1024


class Side:
    """One SR type: its SM_ROOT, SR and calls through its real executable."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.env = dict(os.environ, SM_ROOT=str(root))
        self.sr = str(uuid.uuid4())
        self.n = 0

    def call(self, method: str, **args: Any) -> tuple[float, Any, str]:
        self.n += 1
        dbg = f"bench-{self.kind}-{self.n}"
        args.setdefault("dbg", dbg)
        req = xmlrpc.client.dumps((args,), methodname=method)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, str(PLUGINS[self.kind])], input=req,
                           capture_output=True, text=True, env=self.env, check=False)
        dt = time.perf_counter() - t0
        params, _ = xmlrpc.client.loads(p.stdout)
        body: dict[str, Any] = params[0]  # type: ignore[assignment]
        if body.get("Status") != "Success":
            raise SystemExit(f"{self.kind} {method} failed: {body.get('ErrorDescription')}")
        return dt, body["Value"], dbg

    def ok(self, method: str, **args: Any) -> Any:
        return self.call(method, sr=self.sr, **args)[1]

    def lvm_commands(self, dbg: str) -> list[str]:
        log = self.root / "var" / "log" / "sm" / "sm.log"
        return re.findall(rf"\[{re.escape(dbg)}\] smcommon\.lvm: lvm (\S+)", log.read_text())


def median_calls(side: Side, runs: int, make: Any) -> tuple[float, Counter[str], int]:
    """Median seconds of ``make(i) -> (seconds, dbg)`` and the lvm commands of one run."""
    times, cmds, ncmd = [], Counter[str](), 0
    make(-1)  # warm up
    for i in range(runs):
        dt, dbg = make(i)
        times.append(dt)
        if i == 0:
            found = side.lvm_commands(dbg)
            cmds, ncmd = Counter(found), len(found)
    return statistics.median(times), cmds, ncmd


def populate(side: Side, count: int) -> None:
    """``count`` VDIs, a third of them snapshots, in-process through the driver."""
    sys.path.insert(0, str(PLUGINS[side.kind].parent))
    os.environ["SM_ROOT"] = str(side.root)
    from smcommon.paths import Paths

    mod = __import__(f"{side.kind}_driver")
    plugin = mod.factory(Paths(side.root))
    made = []
    while len(made) < count:
        v = plugin.vdi_create("bench", side.sr, {"name_label": f"s{len(made)}",
                                                   "virtual_size": 8 * MiB})["vdi"]
        made.append(v)
        if len(made) % 3 == 0 and len(made) < count:
            made.append(plugin.vdi_snapshot("bench", side.sr, {"vdi": v})["vdi"])
    del os.environ["SM_ROOT"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scan-vdis", type=int, default=100)
    opts = ap.parse_args()
    from tgtd import Tgtd, available

    why = available()
    if why:
        raise SystemExit(f"cannot run: {why}")
    with tempfile.TemporaryDirectory(prefix="lvmo-bench-") as tmp:
        base = Path(tmp)
        tgtd = Tgtd(base / "tgtd")
        tgtd.start()
        sides = {k: Side(k, base / k) for k in ("lvmoiscsi", "ext")}
        lv, ext = sides["lvmoiscsi"], sides["ext"]
        try:
            t = tgtd.add_target("bench", size=64 << 30)
            dc = {"target": "127.0.0.1", "port": str(tgtd.port), "targetIQN": t.iqn,
                  "SCSIid": t.scsi_id, "chapuser": t.user, "chappassword": t.password}
            (base / "ext-sr").mkdir()
            for side, cfg in ((lv, dc), (ext, {"path": str(base / "ext-sr")})):
                side.call("SR.create", sr=side.sr, device_config=cfg, physical_size="0")
                side.call("SR.attach", sr=side.sr, device_config=cfg)
            rows = []

            def create(side: Side) -> Any:
                def one(i: int) -> tuple[float, str]:
                    dt, _, dbg = side.call("VDI.create", sr=side.sr, vdi_info={
                        "name_label": f"c{i}", "virtual_size": str(8 * MiB)})
                    return dt, dbg
                return one

            def snapshot(side: Side) -> Any:
                from smcommon import vhd

                v = side.ok("VDI.create", vdi_info={"name_label": "s", "virtual_size": str(8 * MiB)})
                path = side.ok("VDI.attach", dp="w", vdi=v["vdi"], read_write=True)["params"]
                side.ok("VDI.activate", dp="w", vdi=v["vdi"])
                vhd.write(path, 0, b"x" * 4096)
                side.ok("VDI.deactivate", dp="w", vdi=v["vdi"])
                side.ok("VDI.detach", dp="w", vdi=v["vdi"])

                def one(i: int) -> tuple[float, str]:
                    dt, _, dbg = side.call("VDI.snapshot", sr=side.sr, vdi_info={"vdi": v["vdi"]})
                    return dt, dbg
                return one

            def datapath(side: Side) -> Any:
                v = side.ok("VDI.create", vdi_info={"name_label": "d", "virtual_size": str(8 * MiB)})

                def one(i: int) -> tuple[float, str]:
                    total = 0.0
                    for m, extra in (("VDI.attach", {"read_write": True}), ("VDI.activate", {}),
                                     ("VDI.deactivate", {}), ("VDI.detach", {})):
                        dt, _, dbg = side.call(m, sr=side.sr, dp="b", vdi=v["vdi"], **extra)
                        total += dt
                        if m == "VDI.activate":
                            keep = dbg
                    return total, keep
                return one

            for name, make in (("VDI.create", create), ("VDI.snapshot", snapshot),
                               ("attach+activate+deactivate+detach (cmds: activate)", datapath)):
                got = {k: median_calls(s, opts.runs, make(s)) for k, s in sides.items()}
                rows.append((name, got))
            for side in (lv, ext):
                populate(side, opts.scan_vdis - len(side.ok("SR.scan")))

            def scan(side: Side) -> Any:
                def one(i: int) -> tuple[float, str]:
                    dt, _value, dbg = side.call("SR.scan", sr=side.sr)
                    return dt, dbg
                return one

            got = {k: median_calls(s, opts.runs, scan(s)) for k, s in sides.items()}
            rows.append((f"SR.scan ({len(lv.ok('SR.scan'))} VDIs)", got))
            load = os.getloadavg()[0]
            print(f"median of {opts.runs} runs; load average {load:.2f}; "
                  f"{sys.executable}")
            print(f"{'call':<52} {'lvmoiscsi':>10} {'ext':>9} {'ratio':>7}  lvm commands")
            for name, got in rows:
                (a, cmds, n), (b, _, _) = got["lvmoiscsi"], got["ext"]
                shown = ", ".join(f"{c} x{k}" if k > 1 else c for c, k in sorted(cmds.items()))
                print(f"{name:<52} {a * 1000:8.0f}ms {b * 1000:7.0f}ms {a / b:7.2f}  "
                      f"{n} ({shown})")
            for side in (lv, ext):
                side.call("SR.detach", sr=side.sr)
        finally:
            tgtd.stop()


if __name__ == "__main__":
    main()
