"""What is particular to lvmoiscsi's VDIs: logical volumes of a real tgtd LUN
(userspace initiator, loop activation, real lvm2 metadata).  What every SR type
does (snapshot, clone, epochs, compose, collection, crashes, concurrency) runs
on lvmoiscsi in the plugin suites of tests/integration/ext (``[lvmoiscsi]``).

Here: LV sizes (a leaf inflated, a frozen base deflated), one ``lvs`` per
SR.scan, lvm commands per call, a snapshot refused under a writer holding the
image open, VDI.copy between two lvmoiscsi SRs and to another type, the
device a get_url names.  Tests end with ``assert_no_leaks``: after SR.gc the
LVs are exactly the MGT volume and the volumes of the VDIs' chains.
"""

from __future__ import annotations

import re

import pytest
from lvmo_helpers import BLOCK, K4, Lvmo, LvmoSR, MiB, detach_and_check, make_sr, pat
from tgtd import Tgtd

pytestmark = [pytest.mark.integration, pytest.mark.root]

EXTENT = 4 * MiB


def lvm_commands(sr: LvmoSR, dbg: str) -> list[str]:
    """The lvm commands logged for the call whose dbg is ``dbg``."""
    log = (sr.ext.root / "var" / "log" / "sm" / "sm.log").read_text()
    return re.findall(rf"\[{re.escape(dbg)}\] smcommon\.lvm: lvm (\S+)", log)


def test_a_vdi_is_an_lv_of_its_fully_allocated_size(lsr: LvmoSR) -> None:
    a = lsr.create("a", 10 * MiB)["vdi"]
    b = lsr.create("b", 6 * MiB)["vdi"]
    lvs = lsr.lvs()
    assert set(lvs) == {"MGT", "VHD-" + a, "VHD-" + b}
    assert lvs["VHD-" + a] == 12 * MiB  # 5 blocks and the metadata, in 4 MiB extents
    scan = lsr.scan()  # physical_utilisation: the LV's size
    assert scan[a]["physical_utilisation"] == 12 * MiB
    lsr.ok("VDI.destroy", vdi=b)
    lsr.wait_gc()  # the SR's collector process (an LVStore of its own) removes the LV
    assert set(lsr.lvs()) == {"MGT", "VHD-" + a}
    lsr.assert_no_leaks()


def test_scan_is_one_lvs_for_the_whole_vg(lsr: LvmoSR) -> None:
    for i in range(3):
        lsr.create(f"v{i}", 4 * MiB)
    lsr.ext.dbg = "scan-count"
    assert len(lsr.scan()) == 3
    assert lvm_commands(lsr, "scan-count") == ["lvs"]


def test_snapshot_sizes_the_lvs(lsr: LvmoSR) -> None:
    """The frozen base shrinks to its VHD (two blocks: two extents); the new
    leaves are one extent until a writer attaches one (then it is whole)."""
    v = lsr.create("base", 8 * MiB)["vdi"]
    lsr.write(v, {0: pat("old0"), BLOCK: pat("old1")})
    s = lsr.snapshot(v)["vdi"]
    chain = lsr.chain(v)
    assert len(chain) == 2 and lsr.chain(s)[1] == chain[1]
    lvs = lsr.lvs()
    assert lvs["VHD-" + chain[1]] == 2 * EXTENT, lvs
    assert lvs["VHD-" + v] == lvs["VHD-" + s] == EXTENT, lvs
    lsr.attach(v, "w", True)
    assert lsr.lvs()["VHD-" + v] == 3 * EXTENT  # 4 blocks and the metadata
    lsr.ok("VDI.detach", dp="w", vdi=v)
    assert lsr.read(s, [(BLOCK, K4)]) == [pat("old1")]
    lsr.assert_no_leaks()


def test_a_snapshot_under_a_writer_holding_the_image_open_is_refused(lsr: LvmoSR) -> None:
    from smcommon.vhd.image import open_image

    v = lsr.create("busy", 8 * MiB)["vdi"]
    path = lsr.attach(v, "vm", True)
    lsr.ok("VDI.activate", dp="vm", vdi=v)
    with open_image(path, writable=True):
        err = lsr.err("VDI.snapshot", vdi_info={"vdi": v})
    assert err[:2] == ["Backend_error", "VDI_IN_USE"], err
    lsr.ok("VDI.deactivate", dp="vm", vdi=v)
    lsr.ok("VDI.detach", dp="vm", vdi=v)
    lsr.assert_no_leaks()


def test_get_url_names_the_activated_leaf(lsr: LvmoSR) -> None:
    from urllib.parse import unquote, urlparse

    from smcommon import vhd

    v = lsr.create("u", 8 * MiB)["vdi"]
    lsr.write(v, {0: pat("url0")})
    url = lsr.ok("VDI.get_url", vdi=v)
    with lsr.opened(v):
        path = unquote(urlparse(url).path)
        assert vhd.read(path, 0, K4) == pat("url0")


def test_copy_to_another_lvmoiscsi_sr(lvmo: Lvmo, tgtd: Tgtd, lsr: LvmoSR) -> None:
    """VDI.copy into another lvmoiscsi SR of this host (another LUN): a flat
    copy of the whole chain; an SR of another type is refused clearly."""
    import uuid

    t2 = tgtd.add_target("copy")
    other = make_sr(lvmo, tgtd, t2)
    try:
        v = lsr.create("src", 8 * MiB)["vdi"]
        lsr.write(v, {0: pat("c0"), 3 * BLOCK: pat("c3")})
        lsr.snapshot(v)
        lsr.write(v, {BLOCK: pat("c1")})
        copy = lsr.ok("VDI.copy", vdi=v, url="", dest=other.uuid)
        assert other.read(copy, [(0, K4), (BLOCK, K4), (3 * BLOCK, K4)]) == [
            pat("c0"), pat("c1"), pat("c3")]
        assert len(other.chain(copy)) == 1
        other.assert_no_leaks()
        lsr.assert_no_leaks()
        from ext_helpers import Ext

        d = lvmo.root / "ext-sr"
        d.mkdir()
        ext_sr = str(uuid.uuid4())
        ext = Ext(lvmo.root, dbg=lvmo.dbg)
        ext.ok("SR.create", sr=ext_sr, device_config={"path": str(d)}, physical_size="0")
        ext.ok("SR.attach", sr=ext_sr, device_config={"path": str(d)})
        err = lsr.err("VDI.copy", vdi=v, url="", dest=ext_sr)
        assert err[:2] == ["Backend_error", "SR_TYPE_DIFFERS"], err
        ext.ok("SR.detach", sr=ext_sr)
    finally:
        detach_and_check(other)
        tgtd.remove_target(t2)


def test_lvm_commands_per_call_stay_few(lsr: LvmoSR) -> None:
    """VDI.create is an lvcreate (plus the one report); a snapshot renames the
    leaf, creates two small LVs and shrinks the base."""
    lsr.ext.dbg = "count-create"
    v = lsr.create("c", 8 * MiB)["vdi"]
    assert sorted(lvm_commands(lsr, "count-create")) == ["lvcreate", "lvs"]
    lsr.ext.dbg = "count-snapshot"
    lsr.snapshot(v)
    cmds = lvm_commands(lsr, "count-snapshot")
    assert sorted(cmds) == ["lvcreate", "lvcreate", "lvrename", "lvresize", "lvs"], cmds
