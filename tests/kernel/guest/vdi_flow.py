"""The VDI half of every kernel-tier scenario, the same for each SR type:
VDI.create; attach+activate read-write, writes with the project's VHD
library (smcommon.vhd: blktap's layout), read back, deactivate+detach;
VDI.snapshot; more writes into the leaf; the snapshot and the leaf read back
through read-only attaches; SR.scan. Each is a step named ``<type>: ...``.
The data is ``patterns.BASE_WRITES`` then ``LEAF_WRITES``, so the host can
check the same bytes afterwards."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from agent import Steps, record
from patterns import BASE_WRITES, LEAF_WRITES, VDI_SIZE, mismatches, pattern
from smapi import Plugin

Writes = list[tuple[int, int, str]]


class VdiFlow:
    def __init__(self, plugin: Plugin, sr: str, label: str) -> None:
        self.p = plugin
        self.sr = sr
        self.label = label
        self.written: dict[str, Writes] = {}
        self.check_params: Callable[[str], None] | None = None

    def _open(self, vdi: str, rw: bool) -> tuple[str, str]:
        dp = f"kt-{'rw' if rw else 'ro'}-{vdi[:8]}"
        info = self.p.ok("VDI.attach", sr=self.sr, vdi=vdi, dp=dp, read_write=rw)
        self.p.ok("VDI.activate", sr=self.sr, vdi=vdi, dp=dp)
        if self.check_params is not None:  # while attached and active
            self.check_params(info["params"])
        return dp, info["params"]

    def _close(self, vdi: str, dp: str) -> None:
        self.p.ok("VDI.deactivate", sr=self.sr, vdi=vdi, dp=dp)
        self.p.ok("VDI.detach", sr=self.sr, vdi=vdi, dp=dp)

    def write(self, vdi: str, writes: Writes) -> dict[str, Any]:
        from smcommon import vhd

        dp, path = self._open(vdi, True)
        t = time.monotonic()
        for off, n, tag in writes:
            vhd.write(path, off, pattern(tag, n))
        record("vhd.write", time.monotonic() - t)
        t = time.monotonic()
        bad = mismatches(lambda o, n: vhd.read(path, o, n), self.written[vdi] + writes)
        record("vhd.read", time.monotonic() - t)
        if bad:
            raise AssertionError(f"read back through {path}: {bad}")
        self._close(vdi, dp)
        self.written[vdi] += writes
        return {"params": path, "written": [[o, n, t] for o, n, t in writes]}

    def read_back(self, vdi: str) -> dict[str, Any]:
        from smcommon import vhd

        dp, path = self._open(vdi, False)
        t = time.monotonic()
        bad = mismatches(lambda o, n: vhd.read(path, o, n), self.written[vdi])
        chain = vhd.chain(path) if os.path.exists(path) else []
        record("vhd.read", time.monotonic() - t)
        self._close(vdi, dp)
        if bad:
            raise AssertionError(f"{vdi} through {path}: {bad}")
        return {"params": path, "chain": chain}

    def run(
        self, steps: Steps, check_params: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """All the steps; returns the VDIs and the images VDI.attach handed
        out (``images``: leaf and snapshot) for the host's check.
        ``check_params`` looks at what each VDI.attach handed out, while the
        VDI is attached and active."""
        lb = self.label
        self.check_params = check_params
        with steps.step(f"{lb}: VDI.create") as r:
            info = {"name_label": "kt-disk", "virtual_size": str(VDI_SIZE)}
            base = self.p.ok("VDI.create", sr=self.sr, vdi_info=info)["vdi"]
            r["vdi"] = base
            self.written[base] = []
        with steps.step(
            f"{lb}: VDI.attach+activate rw, vhd writes, read back, deactivate+detach"
        ) as r:
            r.update(self.write(base, BASE_WRITES))
        with steps.step(f"{lb}: VDI.snapshot") as r:
            snap = self.p.ok(
                "VDI.snapshot",
                sr=self.sr,
                vdi_info={"vdi": base, "name_label": "kt-snap"},
            )["vdi"]
            r["snapshot"] = snap
            self.written[snap] = list(BASE_WRITES)
        with steps.step(f"{lb}: write the leaf after the snapshot") as r:
            r.update(self.write(base, LEAF_WRITES))
        with steps.step(f"{lb}: read back the snapshot and the leaf (attach ro)") as r:
            r["snapshot"] = self.read_back(snap)
            r["leaf"] = self.read_back(base)
            images = {"leaf": r["leaf"]["params"], "snapshot": r["snapshot"]["params"]}
        with steps.step(f"{lb}: SR.scan") as r:
            r["vdis"] = sorted(v["vdi"] for v in self.p.ok("SR.scan", sr=self.sr))
            if sorted([base, snap]) != r["vdis"]:
                raise AssertionError(
                    f"SR.scan lists {r['vdis']}, not {base} and {snap}"
                )
        return {"base": base, "snapshot": snap, "images": images}
