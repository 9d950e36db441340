"""The ext SR on a real block device in the guest (a virtio disk).

Every SMAPI call is the real plugins/ext/EXTSR, with the production host
paths (no SM_ROOT: /run/sm, /var/lib/sm, /var/log/sm): SR.create runs
mkfs.ext4 on the device, SR.attach mounts it with the guest kernel's ext4,
VDIs are VHD files written with the project's VHD library through the path
VDI.attach hands out (vdi_flow.py). params: ``device`` (the disk's
/dev/disk/by-id path), ``sr`` (the SR's uuid).
"""

from __future__ import annotations

import os
from typing import Any

from agent import Steps, sh
from smapi import Plugin, mounts
from vdi_flow import VdiFlow


def run(steps: Steps, params: dict[str, Any]) -> None:
    dev = params["device"]
    real = os.path.realpath(dev)
    sr = params["sr"]
    ext = Plugin("ext", dbg="kernel-tier-ext")
    config = {"device": dev}

    def mounted() -> list[tuple[str, str, str]]:
        return [m for m in mounts() if os.path.realpath(m[0]) == real]

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

    def on_the_mount(params: str) -> None:
        if not params.startswith(mnt + "/"):
            raise AssertionError(
                f"VDI.attach handed out {params}, not a file under {mnt}"
            )

    flow = VdiFlow(ext, sr, "ext")
    vdis = flow.run(steps, on_the_mount)
    with steps.step("ext: SR.detach (umount)") as r:
        ext.ok("SR.detach", sr=sr)
        if mounted():
            raise AssertionError(f"{real} still mounted after SR.detach: {mounted()}")
        r["mounted"] = []
    steps.checkpoint("ext: detached", {"mountpoint": mnt, "images": vdis["images"]})
    with steps.step("ext: SR.attach again, read back") as r:
        ext.ok("SR.attach", sr=sr, device_config=config)
        r["leaf"] = flow.read_back(vdis["base"])
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
