"""The nfs SR with the guest kernel's NFS client (``mount -t nfs``).

The real plugins/nfs/NFSSR with the production host paths; it chooses the
kernel mount itself (the guest kernel has an nfs module: no development
mode). The server is the host's nfs-ganesha fixture (tests/integration/nfs),
reached through qemu's user network at its own address. params: ``server``,
``serverpath``, ``nfsversion``, ``options``, ``sr``, ``dead`` (an address
of the server's subnet that nobody has).

Besides the SR and VDI life cycle (vdi_flow.py): the filer stopped mid-session
(the host stops ganesha at a checkpoint: calls fail, naming the server; it
comes back: the same mount serves again, no re-attach), and a dead filer,
through the plugin (SR.attach) and through the kernel mount the plugin runs
(``mount -t nfs ... retry=0``), each timed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import REPO, Steps, record
from patterns import mismatches
from smapi import Plugin, mounts
from vdi_flow import VdiFlow


def run(steps: Steps, params: dict[str, Any]) -> None:
    sr = params["sr"]
    nfs_sr = Plugin("nfs", dbg="kernel-tier-nfs")
    config = {
        "server": params["server"],
        "serverpath": params["serverpath"],
        "nfsversion": params["nfsversion"],
        "options": params["options"],
    }
    mnt = ""

    def nfs_mounts() -> list[tuple[str, str, str]]:
        return [m for m in mounts() if m[2].startswith("nfs")]

    with steps.step("nfs: SR.create (mounts the export for a moment)") as r:
        nfs_sr.ok("SR.create", sr=sr, device_config=config, physical_size="0")
        r["nfs_mounts_after"] = nfs_mounts()
        if r["nfs_mounts_after"]:
            raise AssertionError(f"SR.create left NFS mounts: {r['nfs_mounts_after']}")
    with steps.step("nfs: SR.attach (mount -t nfs)") as r:
        nfs_sr.ok("SR.attach", sr=sr, device_config=config)
        m = nfs_mounts()
        want = f"{params['server']}:{params['serverpath'].rstrip('/')}/{sr}"
        if len(m) != 1 or m[0][0] != want:
            raise AssertionError(f"after SR.attach, NFS mounts {m}; wanted {want}")
        mnt = m[0][1]
        with open("/proc/self/mounts") as f:
            r["mount"] = next(line.strip() for line in f if f" {mnt} " in line)
        diag = nfs_sr.ok("Query.diagnostics")
        r["diagnostics"] = [x for x in diag.splitlines() if "mode" in x]
        if not any("mount mode: kernel" in x for x in r["diagnostics"]):
            raise AssertionError(f"Query.diagnostics does not say kernel mount: {diag}")

    def on_the_mount(p: str) -> None:
        if not p.startswith(mnt + "/"):
            raise AssertionError(f"VDI.attach handed out {p}, not a file under {mnt}")

    flow = VdiFlow(nfs_sr, sr, "nfs")
    vdis = flow.run(steps, on_the_mount)

    steps.checkpoint("nfs: stop the filer")
    with steps.step("nfs: a call while the filer is stopped") as r:
        t = time.monotonic()
        r["error"] = nfs_sr.err("SR.scan", sr=sr)
        r["seconds"] = round(time.monotonic() - t, 2)
        if params["server"] not in " ".join(r["error"]):
            raise AssertionError(f"the error does not name the server: {r['error']}")
    steps.checkpoint("nfs: start the filer")
    with steps.step(
        "nfs: the filer is back: the same mount serves (no re-attach)"
    ) as r:
        from smcommon import vhd

        r["vdis"] = sorted(v["vdi"] for v in nfs_sr.ok("SR.scan", sr=sr))
        leaf = vdis["images"]["leaf"]  # read straight through the kernel's mount
        bad = mismatches(lambda o, n: vhd.read(leaf, o, n), flow.written[vdis["base"]])
        if bad:
            raise AssertionError(f"{leaf} after the filer's restart: {bad}")

    with steps.step("nfs: SR.detach (umount)") as r:
        nfs_sr.ok("SR.detach", sr=sr)
        r["nfs_mounts_after"] = nfs_mounts()
        if r["nfs_mounts_after"]:
            raise AssertionError(
                f"still mounted after SR.detach: {r['nfs_mounts_after']}"
            )
    steps.checkpoint("nfs: detached", {"mountpoint": mnt, "images": vdis["images"]})
    with steps.step("nfs: SR.attach again, read back") as r:
        nfs_sr.ok("SR.attach", sr=sr, device_config=config)
        r["leaf"] = flow.read_back(vdis["base"])
    with steps.step("nfs: SR.destroy (removes the SR directory, unmounts)") as r:
        nfs_sr.ok("SR.destroy", sr=sr)
        r["nfs_mounts_after"] = nfs_mounts()
        if r["nfs_mounts_after"]:
            raise AssertionError(
                f"still mounted after SR.destroy: {r['nfs_mounts_after']}"
            )

    dead = dict(config, server=params["dead"])
    with steps.step("nfs: a dead filer: SR.attach") as r:
        t = time.monotonic()
        r["error"] = nfs_sr.err("SR.attach", sr=sr, device_config=dead)
        r["seconds"] = round(time.monotonic() - t, 2)
    with steps.step("nfs: a dead filer: the kernel mount (retry=0)") as r:
        r.update(_kernel_mount_of_a_dead_filer(params))


def _kernel_mount_of_a_dead_filer(params: dict[str, Any]) -> dict[str, Any]:
    """The mount the plugin runs (nfs_mounters.KernelMounter, the production
    options: soft, bounded timeo/retrans, retry=0), without the probe that
    precedes it in the plugin: mount.nfs itself against a dead host."""
    sys.path.insert(0, os.path.join(REPO, "plugins", "nfs"))
    from nfs_mounters import KernelMounter
    from smcommon import mount, nfs
    from smcommon.errors import BackendError
    from smcommon.runner import run as runner

    server = nfs.Server(params["dead"], params["nfsversion"])
    target = Path("/run/kt-dead-filer")
    target.mkdir(exist_ok=True)
    argv = mount.mount_argv(
        server.source(params["serverpath"]),
        str(target),
        "nfs",
        nfs.mount_options(server.version),
    )
    t = time.monotonic()
    try:
        KernelMounter(runner).mount(server, params["serverpath"], target, [])
    except BackendError as e:
        took = time.monotonic() - t
        record("mount -t nfs", took)
        return {"argv": argv, "error": [e.code, *e.details], "seconds": round(took, 2)}
    raise AssertionError(f"{' '.join(argv)} mounted a dead filer")
