"""The lvmoiscsi SR in the kernel tier: plugins/lvmoiscsi/LVMoISCSISR in the
guest logs in with open-iscsi (the guest kernel's iscsi_tcp) to the host's
tgtd (tests/integration/lvmoiscsi/tgtd.py; the guest reaches the host's
loopback through qemu's user network) and activates LVs with device-mapper.
guest/scenario_lvmoiscsi.py runs the SR and VDI life cycle, a wrong CHAP
secret and a target that does not exist. While the guest has the SR
detached, the host attaches the same SR with its own LVMoISCSISR (this
kernel has neither initiator nor device-mapper: qemu-storage-daemon and loop
devices over the extents) and reads the VHDs the guest wrote."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from patterns import BASE_WRITES, LEAF_WRITES, mismatches
from scenario import MARKS
from testenv import REPO

sys.path.insert(0, str(REPO / "tests" / "integration" / "lvmoiscsi"))

from tgtd import Target, Tgtd, available

pytestmark = MARKS

GUEST_HOST = "10.0.2.2"  # the host's loopback, seen from the guest


@pytest.fixture
def tgtd(tmp_path: Path) -> Iterator[Tgtd]:
    why = available()
    if why:
        pytest.skip(why)
    t = Tgtd(tmp_path / "tgtd")
    t.start()
    try:
        yield t
    finally:
        t.stop()


LVM_CONF = """\
global {{ activation = 0 use_lvmpolld = 0 event_activation = 0 locking_dir = "{d}" }}
activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 verify_udev_operations = 0 }}
devices {{ obtain_device_list_from_udev = 0 use_devicesfile = 0
          global_filter = [ "a|^{pv}$|", "r|.*|" ] }}
backup {{ backup = 0 archive = 0 }}
"""


def _losetup(*args: str) -> str:
    return subprocess.run(
        ["losetup", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def _lvm_json(env: dict[str, str], *argv: str) -> list[dict[str, str]]:
    p = subprocess.run(
        [*argv, "--reportformat", "json", "--units", "b", "--nosuffix"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert p.returncode == 0, f"{argv}: {p.stderr}"
    report = json.loads(p.stdout)["report"][0]
    return list(next(iter(report.values())))


def _read(image: str, look: list[str], offset: int, length: int) -> bytes:
    from smcommon import vhd

    return vhd.read(image, offset, length, search_dirs=look)


def _host_reads(target: Target, sr: str, data: dict[str, Any], work: Path) -> list[str]:
    """What the guest left on the LUN, read by the host from tgtd's backing
    file: lvm2's report of the VG (a read-only loop device over the file, a
    private configuration with activation off: this kernel has no
    device-mapper), each VHD volume copied out of its extents (segment by
    segment), and both VDIs read through loop devices of those copies with
    the project's VHD library, parents found by their volume names.
    Returns the VG's LV names."""
    from smcommon import vhd

    vg = f"VG_XenStorage-{sr}"
    loops: list[str] = []
    try:
        pv = _losetup("--find", "--show", "--read-only", str(target.backing))
        loops.append(pv)
        conf = work / "lvm"
        conf.mkdir(parents=True)
        (conf / "lvm.conf").write_text(LVM_CONF.format(d=conf, pv=pv))
        env = dict(os.environ, LVM_SYSTEM_DIR=str(conf), LVM_SUPPRESS_FD_WARNINGS="1")
        (pvs,) = _lvm_json(env, "pvs", "-o", "pe_start,vg_extent_size", pv)
        pe_start, extent = int(pvs["pe_start"]), int(pvs["vg_extent_size"])
        segs = _lvm_json(env, "lvs", "--segments", "-o", "lv_name,seg_pe_ranges", vg)
        names = sorted({s["lv_name"] for s in segs})
        vols = work / "volumes"
        devs = work / "dev"
        vols.mkdir()
        devs.mkdir()
        with open(target.backing, "rb") as src:
            for name in names:
                if not name.startswith("VHD-"):
                    continue
                volume = name.removeprefix("VHD-")
                with open(vols / volume, "wb") as out:
                    for s in segs:
                        if s["lv_name"] != name:
                            continue
                        # "/dev/loopN:FIRST-LAST" (physical extents, inclusive)
                        dev, _, span = s["seg_pe_ranges"].rpartition(":")
                        assert dev == pv, s
                        first, last = (int(x) for x in span.split("-"))
                        src.seek(pe_start + first * extent)
                        left = (last - first + 1) * extent
                        while left:
                            chunk = src.read(min(left, 4 << 20))
                            assert chunk, f"{name}: the LUN ends inside its extents"
                            out.write(chunk)
                            left -= len(chunk)
                loop = _losetup("--find", "--show", "--read-only", str(vols / volume))
                loops.append(loop)
                (devs / volume).symlink_to(loop)
        want = {data["base"]: BASE_WRITES + LEAF_WRITES, data["snapshot"]: BASE_WRITES}
        look = [str(devs)]  # parents are named by volume, in the device directory
        for vdi, writes in want.items():
            leaf = str(devs / vdi)
            chain = vhd.chain(leaf, search_dirs=look)
            assert len(chain) == 2, f"VDI {vdi}: chain {chain}"
            bad = mismatches(functools.partial(_read, leaf, look), writes)
            assert bad == [], f"VDI {vdi} read on the host from the LUN: {bad}"
        return names
    finally:
        for loop in reversed(loops):
            subprocess.run(["losetup", "-d", loop], check=False, timeout=60)


def test_lvmoiscsi_sr_with_open_iscsi_and_device_mapper(
    run_guest: Any, tgtd: Tgtd, tmp_path: Path
) -> None:
    target = tgtd.add_target("kt", size=2 << 30)
    sr = str(uuid.uuid4())
    checked: dict[str, Any] = {}

    def at_checkpoint(name: str, data: dict[str, Any]) -> None:
        if name != "lvmoiscsi: detached":
            raise AssertionError(f"unexpected checkpoint {name}")
        checked[name] = _host_reads(target, sr, data, tmp_path / "host-check")

    params = {
        "target": GUEST_HOST,
        "port": tgtd.port,
        "iqn": target.iqn,
        "scsi_id": target.scsi_id,
        "chapuser": target.user,
        "chappassword": target.password,
        "sr": sr,
        "missing_iqn": target.iqn + "-missing",
    }
    run = run_guest(
        "lvmoiscsi",
        params,
        boot=("udev", "network", "iscsid"),
        on_checkpoint=at_checkpoint,
    )
    lvs = checked.get("lvmoiscsi: detached")
    assert lvs, "the host never read the detached SR"
    assert "MGT" in lvs and {
        f"VHD-{v}" for v in run.result("lvmoiscsi: SR.scan")["vdis"]
    } <= set(lvs), lvs
    attach = run.result("lvmoiscsi: SR.attach (iscsiadm login, dm activation)")
    assert len(attach["sessions"]) == 1 and attach["dm"], attach
    chap = run.result("lvmoiscsi: a wrong CHAP secret: SR.attach")["error"]
    assert chap[0] == "Backend_error" or "CHAP" in " ".join(chap), chap
    assert target.password not in " ".join(chap), chap
    missing = run.result("lvmoiscsi: a target that does not exist: SR.attach")["error"]
    assert target.iqn + "-missing" in " ".join(missing), missing
    # the guest destroyed the VG: the LUN holds no LVM label any more
    with open(target.backing, "rb") as f:
        head = f.read(1 << 20)
    assert b"LABELONE" not in head, "SR.destroy left the PV label on the LUN"
