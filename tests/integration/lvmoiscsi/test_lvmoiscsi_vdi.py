"""What ext does, on lvmoiscsi: VDIs as VHDs in logical volumes of a real tgtd
LUN (userspace initiator, loop activation, real lvm2 metadata).

Every test ends with ``assert_no_leaks``: after SR.gc the LVs are exactly the
MGT volume and the volumes of the VDIs' chains (read through their activated
images), every chain sound, leaves visible and parents hidden.
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


def test_create_stat_scan_destroy(lsr: LvmoSR) -> None:
    a = lsr.create("a", 10 * MiB, name_description="first")
    assert a["virtual_size"] == 10 * MiB and a["name_description"] == "first"
    b = lsr.create("b", 6 * MiB)["vdi"]
    scan = lsr.scan()
    assert set(scan) == {a["vdi"], b}
    # physical_utilisation is the LV's size: the VHD fully allocated, in extents
    assert scan[a["vdi"]]["physical_utilisation"] == 12 * MiB  # 5 blocks + metadata
    assert lsr.ok("VDI.stat", vdi=b)["name_label"] == "b"
    lsr.ok("VDI.destroy", vdi=b)
    assert set(lsr.scan()) == {a["vdi"]}
    assert lsr.err("VDI.stat", vdi=b) == ["Vdi_does_not_exist", b]
    assert "VHD-" + b not in lsr.lvs()
    lsr.assert_no_leaks()


def test_scan_is_one_lvs_for_the_whole_vg(lsr: LvmoSR) -> None:
    for i in range(3):
        lsr.create(f"v{i}", 4 * MiB)
    lsr.ext.dbg = "scan-count"
    assert len(lsr.scan()) == 3
    assert lvm_commands(lsr, "scan-count") == ["lvs"]


def test_written_data_reads_back_and_the_leaf_grows_first(lsr: LvmoSR) -> None:
    v = lsr.create("rw", 8 * MiB)["vdi"]
    w = {0: pat("a0"), BLOCK + K4: pat("a1", 3 * K4), 8 * MiB - K4: pat("end")}
    lsr.write(v, w)
    assert lsr.read(v, [(o, len(d)) for o, d in w.items()]) == list(w.values())
    lsr.assert_no_leaks()


@pytest.mark.parametrize("how", ["snapshot", "clone"])
def test_snapshot_and_clone_semantics(lsr: LvmoSR, how: str) -> None:
    a = lsr.create("base", 8 * MiB)
    v = a["vdi"]
    lsr.write(v, {0: pat("old0"), BLOCK: pat("old1")})
    made = getattr(lsr, how)(v)
    s = made["vdi"]
    assert made["virtual_size"] == a["virtual_size"]
    assert made["is_a_snapshot"] is (how == "snapshot")
    assert lsr.read(v, [(0, K4), (BLOCK, K4)]) == [pat("old0"), pat("old1")]
    lsr.write(v, {0: pat("new0"), 2 * BLOCK: pat("new2")})
    assert lsr.read(v, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("new0"), pat("old1"), pat("new2")]
    assert lsr.read(s, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("old0"), pat("old1"), b"\0" * K4]
    if how == "clone":
        lsr.write(s, {BLOCK: pat("clone1")})
        assert lsr.read(v, [(BLOCK, K4)]) == [pat("old1")]
    chain = lsr.chain(v)
    assert len(chain) == 2 and lsr.chain(s)[1] == chain[1]
    # the frozen base is shrunk to its VHD's size (two blocks and the metadata)
    lvs = lsr.lvs()
    assert lvs["VHD-" + chain[1]] == 2 * EXTENT, lvs
    lsr.assert_no_leaks()


def test_snapshot_of_an_activated_vdi_keeps_the_vm_writing_to_the_vdi(lsr: LvmoSR) -> None:
    """The VM's path (attach_info params) names the VDI's leaf after the
    snapshot: its later writes land in the VDI, not in the snapshot."""
    from smcommon import vhd

    v = lsr.create("running", 8 * MiB)["vdi"]
    path = lsr.attach(v, "vm", True)
    lsr.ok("VDI.activate", dp="vm", vdi=v)
    vhd.write(path, 0, pat("before"))
    s = lsr.snapshot(v)["vdi"]
    vhd.write(path, 0, pat("after"))
    vhd.write(path, 3 * BLOCK, pat("after3"))
    lsr.ok("VDI.deactivate", dp="vm", vdi=v)
    lsr.ok("VDI.detach", dp="vm", vdi=v)
    assert lsr.read(s, [(0, K4), (3 * BLOCK, K4)]) == [pat("before"), b"\0" * K4]
    assert lsr.read(v, [(0, K4), (3 * BLOCK, K4)]) == [pat("after"), pat("after3")]
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


def test_non_persistent_epochs(lsr: LvmoSR) -> None:
    v = lsr.create("np", 8 * MiB)["vdi"]
    lsr.write(v, {0: pat("keep")})
    lsr.ok("VDI.set_persistent", vdi=v, persistent=False)
    lsr.ok("VDI.epoch_begin", vdi=v)
    lsr.write(v, {0: pat("e0"), BLOCK: pat("f0")})
    assert lsr.read(v, [(0, K4)]) == [pat("e0")]
    lsr.ok("VDI.epoch_end", vdi=v)
    lsr.ok("VDI.epoch_begin", vdi=v)
    assert lsr.read(v, [(0, K4), (BLOCK, K4)]) == [pat("keep"), b"\0" * K4]
    lsr.ok("VDI.set_persistent", vdi=v, persistent=True)
    lsr.assert_no_leaks()


def test_compose_and_similar_content(lsr: LvmoSR) -> None:
    v1 = lsr.create("one", 8 * MiB)["vdi"]
    v2 = lsr.create("two", 8 * MiB)["vdi"]
    lsr.write(v1, {0: pat("v1-0"), BLOCK: pat("v1-1")})
    lsr.write(v2, {BLOCK: pat("v2-1")})
    lsr.ok("VDI.compose", vdi1=v1, vdi2=v2)
    assert lsr.read(v2, [(0, K4), (BLOCK, K4)]) == [pat("v1-0"), pat("v2-1")]
    assert lsr.read(v1, [(0, K4), (BLOCK, K4)]) == [pat("v1-0"), pat("v1-1")]
    s = lsr.snapshot(v1)["vdi"]
    similar = [x["vdi"] for x in lsr.ok("VDI.similar_content", vdi=v1)]
    assert set(similar) == {s, v2}
    lsr.assert_no_leaks()


def test_destroy_collects_and_coalesces(lsr: LvmoSR) -> None:
    v = lsr.create("chain", 8 * MiB)["vdi"]
    lsr.write(v, {0: pat("g0")})
    s1 = lsr.snapshot(v)["vdi"]
    lsr.write(v, {BLOCK: pat("g1")})
    s2 = lsr.snapshot(v)["vdi"]
    lsr.write(v, {2 * BLOCK: pat("g2")})
    assert len(lsr.chain(v)) == 3
    lsr.ok("VDI.destroy", vdi=s1)
    lsr.ok("VDI.destroy", vdi=s2)
    lsr.ok("SR.gc")
    assert len(lsr.chain(v)) == 1, "the chain was not coalesced"
    assert lsr.read(v, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("g0"), pat("g1"), pat("g2")]
    assert set(lsr.lvs()) == {"MGT", "VHD-" + v}
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


def test_the_sr_survives_a_detach_with_snapshots(lvmo: Lvmo, tgtd: Tgtd, lsr: LvmoSR) -> None:
    v = lsr.create("d", 8 * MiB)["vdi"]
    lsr.write(v, {0: pat("d0")})
    s = lsr.snapshot(v)["vdi"]
    detach_and_check(lsr)
    lvmo.ok("SR.attach", sr=lsr.uuid, device_config=lsr.config)
    assert lsr.read(s, [(0, K4)]) == [pat("d0")]
    lsr.assert_no_leaks()
