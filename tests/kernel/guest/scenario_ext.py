"""The ext SR on a real block device in the guest (a virtio disk).

Every SMAPI call is the real plugins/ext/EXTSR, with the production host
paths (no SM_ROOT: /run/sm, /var/lib/sm, /var/log/sm): SR.create runs
mkfs.ext4 on the device, SR.attach mounts it with the guest kernel's ext4,
VDIs are VHD files written with the project's VHD library through the path
VDI.attach hands out. params: ``device`` (the disk's /dev/disk/by-id path),
``sr`` (the SR's uuid).
"""

from __future__ import annotations

import os
import time
from typing import Any

from agent import Steps, record, sh
from patterns import BASE_WRITES, LEAF_WRITES, VDI_SIZE, mismatches, pattern
from smapi import Plugin, mounts


def run(steps: Steps, params: dict[str, Any]) -> None:
    from smcommon import vhd

    dev = params["device"]
    real = os.path.realpath(dev)
    sr = params["sr"]
    ext = Plugin("ext", dbg="kernel-tier-ext")
    config = {"device": dev}

    def mounted() -> list[tuple[str, str, str]]:
        return [m for m in mounts() if os.path.realpath(m[0]) == real]

    def write(vdi: str, writes: list[tuple[int, int, str]]) -> dict[str, Any]:
        dp = f"kt-rw-{vdi[:8]}"
        info = ext.ok("VDI.attach", sr=sr, vdi=vdi, dp=dp, read_write=True)
        ext.ok("VDI.activate", sr=sr, vdi=vdi, dp=dp)
        path = info["params"]
        t = time.monotonic()
        for off, n, tag in writes:
            vhd.write(path, off, pattern(tag, n))
        record("vhd.write", time.monotonic() - t)
        t = time.monotonic()
        bad = mismatches(lambda o, n: vhd.read(path, o, n), writes_so_far[vdi] + writes)
        record("vhd.read", time.monotonic() - t)
        if bad:
            raise AssertionError(f"read back through {path}: {bad}")
        ext.ok("VDI.deactivate", sr=sr, vdi=vdi, dp=dp)
        ext.ok("VDI.detach", sr=sr, vdi=vdi, dp=dp)
        writes_so_far[vdi] += writes
        return {"params": path, "written": [[o, n, t] for o, n, t in writes]}

    def read_back(vdi: str, want: list[tuple[int, int, str]]) -> dict[str, Any]:
        dp = f"kt-ro-{vdi[:8]}"
        info = ext.ok("VDI.attach", sr=sr, vdi=vdi, dp=dp, read_write=False)
        ext.ok("VDI.activate", sr=sr, vdi=vdi, dp=dp)
        path = info["params"]
        t = time.monotonic()
        bad = mismatches(lambda o, n: vhd.read(path, o, n), want)
        record("vhd.read", time.monotonic() - t)
        ext.ok("VDI.deactivate", sr=sr, vdi=vdi, dp=dp)
        ext.ok("VDI.detach", sr=sr, vdi=vdi, dp=dp)
        if bad:
            raise AssertionError(f"{vdi} through {path}: {bad}")
        return {
            "params": path,
            "chain": vhd.chain(path) if os.path.exists(path) else [],
        }

    writes_so_far: dict[str, list[tuple[int, int, str]]] = {}

    with steps.step("ext: SR.create (mkfs.ext4)") as r:
        ext.ok("SR.create", sr=sr, device_config=config, physical_size="0")
        r["fstype"] = sh("blkid", "-o", "value", "-s", "TYPE", real).stdout.strip()
        if r["fstype"] != "ext4":
            raise AssertionError(
                f"{real} holds {r['fstype']!r} after SR.create, not ext4"
            )
    with steps.step("ext: SR.attach (mount)") as r:
        ext.ok("SR.attach", sr=sr, device_config=config)
        m = mounted()
        if len(m) != 1 or m[0][2] != "ext4":
            raise AssertionError(f"{real} after SR.attach: mounted as {m}")
        r["mount"] = list(m[0])
    mnt = r["mount"][1]
    with steps.step("ext: VDI.create") as r:
        vdi = ext.ok(
            "VDI.create",
            sr=sr,
            vdi_info={"name_label": "kt-disk", "virtual_size": str(VDI_SIZE)},
        )
        r["vdi"] = base = vdi["vdi"]
        writes_so_far[base] = []
    with steps.step(
        "ext: VDI.attach+activate, vhd writes, read back, deactivate+detach"
    ) as r:
        r.update(write(base, BASE_WRITES))
        if not r["params"].startswith(mnt + "/"):
            raise AssertionError(
                f"VDI.attach handed out {r['params']}, not a file under {mnt}"
            )
    with steps.step("ext: VDI.snapshot") as r:
        snap = ext.ok(
            "VDI.snapshot", sr=sr, vdi_info={"vdi": base, "name_label": "kt-snap"}
        )
        r["snapshot"] = snap["vdi"]
        writes_so_far[snap["vdi"]] = list(BASE_WRITES)
    with steps.step("ext: write the leaf after the snapshot") as r:
        r.update(write(base, LEAF_WRITES))
    with steps.step("ext: read back the snapshot and the leaf (attach ro)") as r:
        r["snapshot"] = read_back(snap["vdi"], BASE_WRITES)
        r["leaf"] = read_back(base, BASE_WRITES + LEAF_WRITES)
        images = {"leaf": r["leaf"]["params"], "snapshot": r["snapshot"]["params"]}
    with steps.step("ext: SR.scan") as r:
        scan = ext.ok("SR.scan", sr=sr)
        r["vdis"] = sorted(v["vdi"] for v in scan)
        if sorted([base, snap["vdi"]]) != r["vdis"]:
            raise AssertionError(
                f"SR.scan lists {r['vdis']}, not {base} and {snap['vdi']}"
            )
    with steps.step("ext: SR.detach (umount)") as r:
        ext.ok("SR.detach", sr=sr)
        if mounted():
            raise AssertionError(f"{real} still mounted after SR.detach: {mounted()}")
        r["mounted"] = []
    steps.checkpoint(
        "ext: detached",
        {"mountpoint": mnt, "images": images},
    )
    with steps.step("ext: SR.attach again, read back") as r:
        ext.ok("SR.attach", sr=sr, device_config=config)
        r["leaf"] = read_back(base, BASE_WRITES + LEAF_WRITES)
    with steps.step("ext: SR.destroy (umount, wipefs)") as r:
        ext.ok("SR.destroy", sr=sr)
        if mounted():
            raise AssertionError(f"{real} still mounted after SR.destroy: {mounted()}")
        probe = sh("blkid", "-p", real, check=False)
        r["blkid_rc"] = probe.returncode  # 2: nothing found
        if probe.returncode != 2:
            raise AssertionError(
                f"{real} after SR.destroy: blkid -p says {probe.stdout!r}"
            )
        r["attach_after_destroy"] = ext.err("SR.attach", sr=sr, device_config=config)
