"""SR-level behaviour of LVMoISCSISR against a real tgtd target and real lvm2.

This kernel has no iSCSI initiator and no device-mapper: the LUN is carried by
the userspace initiator (qemu-storage-daemon's iSCSI export over FUSE, then a
loop device: real iSCSI traffic for every byte) and LVs are activated as loop
devices over their extents; every lvm2 metadata operation is real.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from lvmo_helpers import (
    BLOCK,
    K4,
    Lvmo,
    LvmoSR,
    MiB,
    detach_and_check,
    device_config,
    make_sr,
    pat,
)
from tgtd import Target, Tgtd

pytestmark = [pytest.mark.integration, pytest.mark.root]


def test_create_attach_detach_keeps_the_vdis(lvmo: Lvmo, lsr: LvmoSR) -> None:
    a = lsr.create("a", 8 * MiB)["vdi"]
    lsr.write(a, {0: pat("a0"), BLOCK: pat("a1")})
    lvs = lsr.lvs()
    assert set(lvs) == {"MGT", "VHD-" + a}
    tags = lsr.vg_tags()
    assert any(t.startswith("sm_owner=") for t in tags), tags
    detach_and_check(lsr)
    assert lvmo.ok("SR.ls") == []
    lvmo.ok("SR.attach", sr=lsr.uuid, device_config=lsr.config)
    assert set(lsr.scan()) == {a}
    assert lsr.read(a, [(0, K4), (BLOCK, K4)]) == [pat("a0"), pat("a1")]


def test_query_and_diagnostics_name_the_backends(lvmo: Lvmo, lsr: LvmoSR) -> None:
    q = lvmo.ok("Query.query")
    assert q["driver"] == "lvmoiscsi"
    assert {"target", "port", "targetIQN", "SCSIid", "chapuser", "chappassword",
            "incoming_chapuser", "incoming_chappassword", "multihomed"} <= set(q["configuration"])
    text = lvmo.ok("Query.diagnostics")
    assert "iSCSI initiator: userspace (qemu-storage-daemon" in text
    assert "LV activation: loop devices" in text
    assert lsr.uuid in text


def test_create_without_iqn_or_scsiid_lists_what_there_is(
    lvmo: Lvmo, tgtd: Tgtd, target: Target
) -> None:
    dc = device_config(tgtd, target)
    no_iqn = {k: v for k, v in dc.items() if k not in ("targetIQN", "SCSIid")}
    err = lvmo.err("SR.create", sr="s1", device_config=no_iqn, physical_size="0")
    assert err[:2] == ["Backend_error", "ISCSI_TARGET_IQN_REQUIRED"]
    assert target.iqn in err[2]
    no_lun = {k: v for k, v in dc.items() if k != "SCSIid"}
    err = lvmo.err("SR.create", sr="s1", device_config=no_lun, physical_size="0")
    assert err[:2] == ["Backend_error", "ISCSI_SCSIID_REQUIRED"]
    assert f"LUN 1: SCSIid {target.scsi_id}" in err[2]
    assert target.password not in " ".join(err)
    err = lvmo.err("SR.create", sr="s1", device_config={"port": "3260"}, physical_size="0")
    assert err[:2] == ["Backend_error", "DEVICE_CONFIG_INVALID"] and "'target'" in err[2]


def test_portals_are_tried_in_order(lvmo: Lvmo, tgtd: Tgtd, target: Target) -> None:
    """target lists several portals (host:port each, or the port key): one that
    refuses connections is passed over for the next."""
    from tgtd import free_port

    dead = f"127.0.0.1:{free_port()}"
    dc = device_config(tgtd, target, target=f"{dead},127.0.0.1")
    sr = str(uuid.uuid4())
    lvmo.ok("SR.create", sr=sr, device_config=dc, physical_size="0")
    lvmo.ok("SR.attach", sr=sr, device_config=dc)
    state = LvmoSR(lvmo, sr, dc, target).state()
    assert state["lun"]["portals"] == [f"127.0.0.1:{tgtd.port}"]
    lvmo.ok("SR.detach", sr=sr)
    err = lvmo.err("SR.attach", sr=sr, device_config={**dc, "target": dead})
    assert err[:2] == ["Backend_error", "ISCSI_UNREACHABLE"], err


def test_a_wrong_chap_secret_is_a_clear_error_that_never_shows_it(
    lvmo: Lvmo, tgtd: Tgtd, target: Target, sm_root: Path
) -> None:
    wrong = "Wr0ng-s3cret-xyz"
    dc = device_config(tgtd, target, chappassword=wrong)
    err = lvmo.err("SR.create", sr="s1", device_config=dc, physical_size="0")
    assert err[:2] == ["Backend_error", "ISCSI_CHAP_FAILED"], err
    dc = device_config(tgtd, target, chapuser=None, chappassword=None)
    err = lvmo.err("SR.create", sr="s1", device_config=dc, physical_size="0")
    assert err[:2] == ["Backend_error", "ISCSI_CHAP_REQUIRED"], err
    everything = b"".join(p.read_bytes() for p in sm_root.rglob("*") if p.is_file())
    assert wrong.encode() not in everything
    assert target.password.encode() not in everything


def test_no_secret_is_kept_on_disk_while_attached(lsr: LvmoSR, sm_root: Path) -> None:
    files = [p for p in sm_root.rglob("*") if p.is_file() and "sr-mount" not in str(p)]
    for p in files:
        if p.name == "lun.fuse":
            continue
        assert lsr.target.password.encode() not in p.read_bytes(), p
    assert (lsr.state_dir.stat().st_mode & 0o077) == 0, "the SR's state is not private"


def test_a_lun_holding_an_sr_is_not_taken_by_another(
    lvmo: Lvmo, tgtd: Tgtd, lsr: LvmoSR
) -> None:
    err = lvmo.err("SR.create", sr="another", device_config=lsr.config, physical_size="0")
    assert err[:2] == ["Backend_error", "LUN_IN_USE"], err
    assert lsr.vg in err[2]


def test_one_host_owns_the_vg(
    lvmo: Lvmo, lsr: LvmoSR, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A second host (another SM_ROOT: its own host id, initiator, loops) may not
    attach the SR while the first has it, unless told to take over; the first
    host then refuses to go on."""
    from ext_helpers import leftover_processes

    other_root = tmp_path / "host2"
    other_root.mkdir()
    other = Lvmo(other_root, dbg=f"itest:{request.node.name}:host2")
    try:
        err = other.err("SR.attach", sr=lsr.uuid, device_config=lsr.config)
        assert err[:2] == ["Backend_error", "SR_OWNED_BY_ANOTHER_HOST"], err
        assert "takeover" in err[2]
        assert other.ok("SR.ls") == []
        other.ok("SR.attach", sr=lsr.uuid, device_config={**lsr.config, "takeover": "true"})
        err = lsr.err("VDI.create", vdi_info={"name_label": "x", "virtual_size": str(MiB)})
        assert err[:2] == ["Backend_error", "SR_OWNER_CHANGED"], err
        assert other.ok("SR.scan", sr=lsr.uuid) == []
    finally:
        other.call("SR.detach", sr=lsr.uuid)
        assert not leftover_processes(other_root)


def test_destroy_removes_the_vg_and_leaves_nothing(lvmo: Lvmo, tgtd: Tgtd, target: Target) -> None:
    sr = make_sr(lvmo, tgtd, target)
    v = sr.create("v", 8 * MiB)["vdi"]
    sr.snapshot(v)
    state = sr.state()
    lvmo.ok("SR.destroy", sr=sr.uuid)
    assert lvmo.ok("SR.ls") == []
    assert not sr.state_dir.exists()
    # the LUN is blank for LVM: a new SR can be created on it
    again = make_sr(lvmo, tgtd, target)
    assert again.scan() == {}
    assert state["vg"] != again.vg
    detach_and_check(again)


@pytest.mark.slow
def test_a_target_that_goes_away_gives_clear_errors_and_the_sr_recovers(
    lvmo: Lvmo, tmp_path: Path
) -> None:
    """tgtd killed: calls fail at once with ISCSI_UNREACHABLE (no call hangs on
    I/O that would wait for the target); tgtd back with the same LUN: the same
    SR works again, its data intact."""
    own = Tgtd(tmp_path / "tgtd")
    own.start()
    try:
        t = own.add_target("away")
        sr = make_sr(lvmo, own, t)
        v = sr.create("v", 8 * MiB)["vdi"]
        sr.write(v, {0: pat("kept")})
        own.kill()
        for method, args in (
            ("VDI.create", {"vdi_info": {"name_label": "n", "virtual_size": str(MiB)}}),
            ("SR.scan", {}),
            ("VDI.attach", {"dp": "d", "vdi": v, "read_write": False}),
        ):
            start = time.monotonic()
            err = sr.err(method, **args)
            took = time.monotonic() - start
            assert err[:2] == ["Backend_error", "ISCSI_UNREACHABLE"], (method, err)
            assert "127.0.0.1" in err[2]
            assert took < 30, f"{method} took {took:.1f}s with the target away"
        own.start()
        assert sr.read(v, [(0, K4)]) == [pat("kept")]
        w = sr.create("w", 8 * MiB)["vdi"]
        assert set(sr.scan()) == {v, w}
        detach_and_check(sr)
    finally:
        own.stop()


def test_foreign_lvs_survive_destroy_and_gc_and_a_valid_vhd_is_adopted(
    lvmo: Lvmo, lsr: LvmoSR
) -> None:
    """Logical volumes the SR did not make, added to its VG by hand with the
    real lvm2 (through the SR's private configuration): a plain LV holding
    someone's bytes, and a ``VHD-<uuid>`` LV holding a valid VHD written
    through a loop device.  A VDI.destroy of an unrelated VDI and SR.gc (the
    collector) leave both untouched; Query.diagnostics lists them as foreign;
    SR.scan adopts the valid VHD (an ordinary VDI from then on) and only it.
    (The LVM form of tests/integration/ext/test_ext_foreign.py.)"""
    from smcommon import vhd

    a = lsr.create("a", 8 * MiB)["vdi"]
    lsr.write(a, {0: pat("a0")})
    s = lsr.snapshot(a)["vdi"]
    plain, u = "someone-elses", str(uuid.uuid4())
    lsr.lvm("lvcreate", "-an", "-Zn", "-L", "8m", "-n", plain, lsr.vg)
    lsr.lvm("lvcreate", "-an", "-Zn", "-L", "16m", "-n", f"VHD-{u}", lsr.vg)
    theirs = pat("theirs", 64 * 1024)
    with lsr.lv_device(plain, writable=True) as dev:
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, theirs, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    with lsr.lv_device(f"VHD-{u}", writable=True) as dev:
        vhd.create(dev, 8 * MiB)
        vhd.write(dev, BLOCK, pat("adopt-me"))

    def plain_bytes() -> bytes:
        with lsr.lv_device(plain) as dev, open(dev, "rb") as f:
            return f.read(len(theirs))

    lsr.ok("VDI.destroy", vdi=s)
    lsr.ok("SR.gc")
    assert {plain, f"VHD-{u}"} <= set(lsr.lvs())
    assert plain_bytes() == theirs
    diag = lvmo.ok("Query.diagnostics")
    assert plain in diag and u in diag and "foreign" in diag, diag
    assert lsr.read(a, [(0, K4)]) == [pat("a0")]

    scan = lsr.scan()
    assert set(scan) == {a, u}
    assert int(scan[u]["virtual_size"]) == 8 * MiB
    assert lsr.read(u, [(BLOCK, K4), (0, K4)]) == [pat("adopt-me"), b"\0" * K4]
    lsr.ok("VDI.destroy", vdi=u)
    lsr.ok("SR.gc")
    lvs = set(lsr.lvs())
    assert plain in lvs and f"VHD-{u}" not in lvs
    assert plain_bytes() == theirs
    lsr.lvm("lvremove", "-f", f"{lsr.vg}/{plain}")  # the SR is ours again
    lsr.assert_no_leaks()
