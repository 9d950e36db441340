"""The lvmoiscsi SR with the guest kernel's iSCSI initiator and device-mapper.

The real plugins/lvmoiscsi/LVMoISCSISR with the production host paths; it
chooses open-iscsi (``iscsiadm``, the kernel's iscsi_tcp) and device-mapper
activation (``lvchange -ay``) itself: the guest kernel has both. The target
is the host's tgtd, reached through qemu's user network (10.0.2.2 is the
host's loopback). params: ``target``, ``port``, ``iqn``, ``scsi_id``,
``chapuser``, ``chappassword``, ``sr``, ``missing_iqn`` (a target the
portal does not have).

Besides the SR and VDI life cycle (vdi_flow.py; every VDI.attach hands out a
device-mapper node): after SR.detach and SR.destroy, no iSCSI session and no
device-mapper device of the SR's volume group is left; a wrong CHAP secret
and a target that does not exist are clear errors (the secret in none).
"""

from __future__ import annotations

import os
from typing import Any

from agent import Steps, sh
from smapi import Plugin
from vdi_flow import VdiFlow


def sessions() -> list[str]:
    """``iscsiadm -m session`` lines (rc 21: none)."""
    r = sh("iscsiadm", "-m", "session", check=False)
    if r.returncode not in (0, 21):
        raise RuntimeError(f"iscsiadm -m session exited {r.returncode}: {r.stderr}")
    return [x for x in r.stdout.splitlines() if x.strip()] if r.returncode == 0 else []


def dm_devices(vg: str) -> list[str]:
    """device-mapper devices of the volume group (dm names double each '-')."""
    prefix = vg.replace("-", "--") + "-"
    out = sh("dmsetup", "ls").stdout
    return [x.split()[0] for x in out.splitlines() if x.startswith(prefix)]


def run(steps: Steps, params: dict[str, Any]) -> None:
    sr = params["sr"]
    vg = f"VG_XenStorage-{sr}"
    lvmo = Plugin("lvmoiscsi", dbg="kernel-tier-lvmoiscsi")
    config = {
        "target": params["target"],
        "port": str(params["port"]),
        "targetIQN": params["iqn"],
        "SCSIid": params["scsi_id"],
        "chapuser": params["chapuser"],
        "chappassword": params["chappassword"],
    }
    portal = f"{params['target']}:{params['port']}"

    def ours() -> list[str]:
        return [s for s in sessions() if params["iqn"] in s and portal in s]

    def nothing_left(r: dict[str, Any], after: str) -> None:
        r["sessions"], r["dm"] = ours(), dm_devices(vg)
        if r["sessions"] or r["dm"]:
            raise AssertionError(
                f"after {after}: iSCSI sessions {r['sessions']}, dm devices {r['dm']}"
            )

    with steps.step("lvmoiscsi: SR.create (iscsiadm login, pvcreate, vgcreate)") as r:
        lvmo.ok("SR.create", sr=sr, device_config=config, physical_size="0")
        nothing_left(r, "SR.create")
    with steps.step("lvmoiscsi: SR.attach (iscsiadm login, dm activation)") as r:
        lvmo.ok("SR.attach", sr=sr, device_config=config)
        r["sessions"] = ours()
        if len(r["sessions"]) != 1:
            raise AssertionError(
                f"after SR.attach, sessions {sessions()}; wanted {portal}"
            )
        r["dm"] = dm_devices(vg)
        diag = lvmo.ok("Query.diagnostics")
        r["diagnostics"] = [
            x for x in diag.splitlines() if "initiator" in x or "activation" in x
        ]
        text = " ".join(r["diagnostics"])
        if "kernel" not in text or "device-mapper" not in text:
            raise AssertionError(
                f"Query.diagnostics does not say kernel initiator and device-mapper: {diag}"
            )

    def a_dm_node(p: str) -> None:
        real = os.path.realpath(p)
        if not real.startswith("/dev/dm-"):
            raise AssertionError(f"VDI.attach handed out {p} ({real}), not a dm device")

    flow = VdiFlow(lvmo, sr, "lvmoiscsi")
    vdis = flow.run(steps, a_dm_node)
    with steps.step("lvmoiscsi: SR.detach (deactivate every LV, logout)") as r:
        lvmo.ok("SR.detach", sr=sr)
        nothing_left(r, "SR.detach")
    steps.checkpoint(
        "lvmoiscsi: detached", {"base": vdis["base"], "snapshot": vdis["snapshot"]}
    )
    with steps.step("lvmoiscsi: SR.attach again, read back") as r:
        lvmo.ok("SR.attach", sr=sr, device_config=config)
        r["leaf"] = flow.read_back(vdis["base"])
    with steps.step("lvmoiscsi: SR.destroy (vgremove, logout)") as r:
        lvmo.ok("SR.destroy", sr=sr)
        nothing_left(r, "SR.destroy")

    with steps.step("lvmoiscsi: a wrong CHAP secret: SR.attach") as r:
        wrong = "x" + params["chappassword"][::-1]
        r["error"] = lvmo.err(
            "SR.attach", sr=sr, device_config=dict(config, chappassword=wrong)
        )
        if wrong in " ".join(r["error"]) or params["chappassword"] in " ".join(
            r["error"]
        ):
            raise AssertionError("the error shows the CHAP secret")
        nothing_left(r, "a refused login")
    with steps.step("lvmoiscsi: a target that does not exist: SR.attach") as r:
        r["error"] = lvmo.err(
            "SR.attach",
            sr=sr,
            device_config=dict(config, targetIQN=params["missing_iqn"]),
        )
        if params["missing_iqn"] not in " ".join(r["error"]):
            raise AssertionError(f"the error does not name the target: {r['error']}")
        nothing_left(r, "a login to a missing target")
