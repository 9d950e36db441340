"""VDI.* through the real EXTSR: metadata, datapaths, snapshot/clone trees and
their data, epochs, get_url, copy, compose, similar_content.

Data is written and read with ``smcommon.vhd`` on the image that
``VDI.attach`` names (``attach_info.params``), as a VM backend would."""

from __future__ import annotations

import urllib.parse
import uuid
from pathlib import Path

import pytest
from ext_helpers import BLOCK, SR, Ext, MiB, SrFactory, vinfo

pytestmark = pytest.mark.integration

K4 = 4096


def pat(tag: str, n: int = K4) -> bytes:
    """n bytes of a recognisable pattern."""
    unit = (tag.encode() + b"-") * 8
    return (unit * (n // len(unit) + 1))[:n]


# --- metadata --------------------------------------------------------------------


def test_create_stat_scan_get_by_name(sr: SR) -> None:
    made = sr.create(
        "disk0",
        5 * MiB + 1,
        name_description="the first disk",
        ty="user",
        sm_config={"k": "v"},
    )
    key = made["vdi"]
    assert isinstance(key, str) and key
    assert made["name_label"] == "disk0"
    assert made["name_description"] == "the first disk"
    # rounded up, never down
    assert made["virtual_size"] >= 5 * MiB + 1
    assert made["virtual_size"] % (512) == 0
    assert made["persistent"] is True
    assert made["read_only"] is False
    assert made["is_a_snapshot"] is False
    assert made["sm_config"].get("k") == "v"
    assert isinstance(made["physical_utilisation"], int)
    st = sr.ok("VDI.stat", vdi=key)
    for f in (
        "vdi",
        "name_label",
        "name_description",
        "virtual_size",
        "content_id",
        "ty",
    ):
        assert st[f] == made[f], f
    assert sr.scan()[key]["name_label"] == "disk0"
    assert sr.ok("VDI.get_by_name", name="disk0")["vdi"] == key
    err = sr.err("VDI.get_by_name", name="no-such-name")
    assert err[0] in ("Vdi_does_not_exist", "Does_not_exist"), err


def test_stat_and_destroy_of_missing_vdi(sr: SR) -> None:
    missing = str(uuid.uuid4())
    assert sr.err("VDI.stat", vdi=missing) == ["Vdi_does_not_exist", missing]
    assert sr.err("VDI.destroy", vdi=missing) == ["Vdi_does_not_exist", missing]
    assert (
        sr.err("VDI.attach", vdi=missing, dp="d", read_write=True)[0]
        == "Vdi_does_not_exist"
    )
    assert sr.err("VDI.snapshot", vdi_info={"vdi": missing})[0] == "Vdi_does_not_exist"
    assert (
        sr.err("VDI.set_content_id", vdi=missing, content_id="c")[0]
        == "Vdi_does_not_exist"
    )


def test_destroy(sr: SR) -> None:
    a = sr.create("a")
    b = sr.create("b")
    sr.ok("VDI.destroy", vdi=a["vdi"])
    assert sr.err("VDI.stat", vdi=a["vdi"]) == ["Vdi_does_not_exist", a["vdi"]]
    assert set(sr.scan()) == {b["vdi"]}
    assert sr.err("VDI.destroy", vdi=a["vdi"])[0] == "Vdi_does_not_exist"
    sr.assert_consistent()


def test_destroy_of_an_attached_vdi_is_refused(sr: SR) -> None:
    a = sr.create("a")
    sr.attach(a["vdi"], "vm", True)
    err = sr.err("VDI.destroy", vdi=a["vdi"])
    assert err[0] == "Backend_error", err
    assert sr.ok("VDI.stat", vdi=a["vdi"])
    sr.ok("VDI.detach", dp="vm", vdi=a["vdi"])
    sr.ok("VDI.destroy", vdi=a["vdi"])


def test_set_content_id_and_persistent(sr: SR) -> None:
    a = sr.create("a")
    sr.ok("VDI.set_content_id", vdi=a["vdi"], content_id="cid-42")
    assert sr.ok("VDI.stat", vdi=a["vdi"])["content_id"] == "cid-42"
    sr.ok("VDI.set_persistent", vdi=a["vdi"], persistent=False)
    assert sr.ok("VDI.stat", vdi=a["vdi"])["persistent"] is False
    sr.ok("VDI.set_persistent", vdi=a["vdi"], persistent=True)
    assert sr.ok("VDI.stat", vdi=a["vdi"])["persistent"] is True
    # visible VDIs only, whatever the persistence did to the tree
    assert set(sr.scan()) == {a["vdi"]}
    sr.assert_consistent()


def test_metadata_survives_a_detach(sr: SR) -> None:
    a = sr.create("meta", name_description="desc", sm_config={"x": "y"})
    sr.ok("VDI.set_content_id", vdi=a["vdi"], content_id="c1")
    sr.ok("SR.detach")
    sr.ok("SR.attach", device_config=sr.config)
    st = sr.ok("VDI.stat", vdi=a["vdi"])
    assert (st["name_label"], st["name_description"], st["content_id"]) == (
        "meta",
        "desc",
        "c1",
    )
    assert st["sm_config"].get("x") == "y"


# --- datapaths over the wire ---------------------------------------------------------


def test_datapath_automaton_over_the_wire(sr: SR) -> None:
    v = sr.create("dp")["vdi"]

    def ok(op: str, dp: str = "d1", **kw: object) -> object:
        return sr.ok(f"VDI.{op}", dp=dp, vdi=v, **kw)

    def err(op: str, dp: str = "d1", **kw: object) -> list[str]:
        return sr.err(f"VDI.{op}", dp=dp, vdi=v, **kw)

    assert err("activate") == ["Illegal_transition", "Detached", "Activated(RO)"]
    ok("deactivate")  # no-op on Detached
    ok("detach")  # no-op on Detached
    info = ok("attach", read_write=False)
    assert isinstance(info, dict) and info["params"]
    ok("attach", read_write=False)  # repeat: no-op
    ok("attach", read_write=True)  # RW over RO: upgrade
    e = err("attach", read_write=False)  # RO over RW: refused
    assert e[0] == "Backend_error", e
    ok("activate")
    ok("activate")  # repeat
    assert err("detach") == ["Illegal_transition", "Activated(RW)", "Detached"]
    # a second datapath of the same VDI
    sr.ok("VDI.attach", dp="d2", vdi=v, read_write=False)
    sr.ok("VDI.activate", dp="d2", vdi=v)
    ok("deactivate")
    ok("deactivate")  # repeat
    ok("detach")
    # d2 still holds the VDI: destroy refused
    assert sr.err("VDI.destroy", vdi=v)[0] == "Backend_error"
    sr.ok("VDI.deactivate", dp="d2", vdi=v)
    sr.ok("VDI.detach", dp="d2", vdi=v)
    sr.ok("VDI.destroy", vdi=v)


def test_attach_info_names_the_image(each_sr: SR) -> None:
    sr = each_sr
    from smcommon import vhd

    a = sr.create("img", 6 * MiB)
    path = sr.attach(a["vdi"], "d", False)
    info = vhd.info(path)
    assert info.virtual_size == a["virtual_size"]
    assert sr.holds_image(path)
    assert vhd.read(path, 0, K4) == b"\0" * K4
    sr.ok("VDI.detach", dp="d", vdi=a["vdi"])


def test_written_data_reads_back(sr: SR) -> None:
    a = sr.create("rw", 8 * MiB)["vdi"]
    w = {0: pat("a0"), BLOCK + K4: pat("a1", 3 * K4), 8 * MiB - K4: pat("end")}
    sr.write(a, w)
    got = sr.read_attached(a, [(off, len(d)) for off, d in w.items()])
    assert got == list(w.values())


# --- snapshot and clone ------------------------------------------------------------------


def test_snapshot_semantics(each_sr: SR) -> None:
    fork_semantics(each_sr, "snapshot")


def test_clone_semantics(sr: SR) -> None:
    fork_semantics(sr, "clone")


def fork_semantics(sr: SR, how: str) -> None:
    """write, snapshot (clone), write more: the copy has the old bytes, the VDI the new."""
    a = sr.create("base", 8 * MiB)
    v = a["vdi"]
    sr.write(v, {0: pat("old0"), BLOCK: pat("old1")})
    made = getattr(sr, how)(v)
    s = made["vdi"]
    assert s != v
    assert made["virtual_size"] == a["virtual_size"]
    if how == "snapshot":
        assert made["is_a_snapshot"] is True
        assert made["snapshot_of"] == v
        assert made["snapshot_time"]
    else:
        assert made["is_a_snapshot"] is False
    # the VDI keeps its key and its data, and goes on
    assert sr.read(v, [(0, K4), (BLOCK, K4)]) == [pat("old0"), pat("old1")]
    sr.write(v, {0: pat("new0"), 2 * BLOCK: pat("new2")})
    assert sr.read(v, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("new0"),
        pat("old1"),
        pat("new2"),
    ]
    # the copy has the old bytes
    assert sr.read(s, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("old0"),
        pat("old1"),
        b"\0" * K4,
    ]
    # writes to a clone do not reach the VDI
    if how == "clone":
        sr.write(s, {BLOCK: pat("clone1")})
        assert sr.read(v, [(BLOCK, K4)]) == [pat("old1")]
    scan = sr.assert_consistent()
    assert set(scan) == {v, s}
    assert scan[v]["is_a_snapshot"] is False


def test_snapshot_of_an_activated_vdi_keeps_the_vm_writing_to_the_vdi(sr: SR) -> None:
    """A VM holds the image path from attach_info while it runs; a snapshot
    taken meanwhile must not let its later writes land in the snapshot.
    Either the snapshot is refused or the path stays the VDI's."""
    from smcommon import vhd

    v = sr.create("running", 8 * MiB)["vdi"]
    path = sr.attach(v, "vm", True)
    sr.ok("VDI.activate", dp="vm", vdi=v)
    vhd.write(path, 0, pat("before"))
    r = sr.ext.call("VDI.snapshot", sr=sr.uuid, vdi_info={"vdi": v})
    if r.ok:
        vhd.write(path, 0, pat("after"))  # the VM goes on writing where it was
        s = r.value["vdi"]
        assert sr.read(s, [(0, K4)]) == [pat("before")], (
            "VM's write reached the snapshot"
        )
        assert sr.read(
            v,
            [(0, K4)],
        ) == [pat("after")], "VM's write lost from the VDI"
    else:
        assert r.error[0] == "Backend_error", r.describe()
    sr.ok("VDI.deactivate", dp="vm", vdi=v)
    sr.ok("VDI.detach", dp="vm", vdi=v)
    sr.assert_consistent()


@pytest.mark.sr_types("ext", "nfs")  # lvmoiscsi: LV sizes, test_lvmoiscsi_vdi.py
def test_snapshot_cost_does_not_depend_on_data(sr: SR) -> None:
    """Snapshot copies nothing: the new leaves are (nearly) empty images."""
    v = sr.create("big", 64 * MiB)["vdi"]
    sr.write(v, {i * BLOCK: pat(f"b{i}", BLOCK) for i in range(0, 32, 4)})
    before = sum(p.stat().st_blocks for p in sr.vhd_files())
    s = sr.snapshot(v)["vdi"]
    after = sum(p.stat().st_blocks for p in sr.vhd_files())
    assert (after - before) * 512 < 2 * MiB, "snapshot copied data"
    assert sr.read(s, [(4 * BLOCK, K4)]) == [pat("b4", K4)]


def test_snapshot_fields_given_by_the_caller(sr: SR) -> None:
    v = sr.create("orig")["vdi"]
    s = sr.snapshot(v, name_label="snap-1", name_description="taken by test")
    assert s["name_label"] == "snap-1"
    assert s["name_description"] == "taken by test"
    st = sr.ok("VDI.stat", vdi=s["vdi"])
    assert st["is_a_snapshot"] is True and st["snapshot_of"] == v
    assert sr.ok("VDI.stat", vdi=v)["name_label"] == "orig"


# --- epochs ---------------------------------------------------------------------------------


def test_non_persistent_epochs(sr: SR) -> None:
    v = sr.create("np", 8 * MiB)["vdi"]
    sr.write(v, {0: pat("keep")})
    sr.ok("VDI.set_persistent", vdi=v, persistent=False)
    for epoch in range(1):
        sr.ok("VDI.epoch_begin", vdi=v)
        assert sr.read(v, [(0, K4), (BLOCK, K4)]) == [pat("keep"), b"\0" * K4], epoch
        sr.write(v, {0: pat(f"e{epoch}"), BLOCK: pat(f"f{epoch}")})
        assert sr.read(v, [(0, K4)]) == [pat(f"e{epoch}")]
        sr.ok("VDI.epoch_end", vdi=v)
    sr.ok("VDI.epoch_begin", vdi=v)
    assert sr.read(v, [(0, K4), (BLOCK, K4)]) == [pat("keep"), b"\0" * K4]
    sr.assert_consistent()


def test_persistent_epochs_keep_writes(sr: SR) -> None:
    v = sr.create("p", 8 * MiB)["vdi"]
    sr.ok("VDI.epoch_begin", vdi=v)
    sr.write(v, {0: pat("stay")})
    sr.ok("VDI.epoch_end", vdi=v)
    sr.ok("VDI.epoch_begin", vdi=v)
    assert sr.read(v, [(0, K4)]) == [pat("stay")]


# --- get_url, copy ---------------------------------------------------------------------------


@pytest.mark.sr_types("ext", "nfs")  # lvmoiscsi: an LV is readable once activated
def test_get_url_gives_read_access(sr: SR) -> None:
    from smcommon import vhd

    v = sr.create("u", 8 * MiB)["vdi"]
    sr.write(v, {0: pat("url0")})
    sr.snapshot(v)  # the VDI's data now spans a chain
    sr.write(v, {BLOCK: pat("url1")})
    url = sr.ok("VDI.get_url", vdi=v)
    assert isinstance(url, str) and "://" in url
    parsed = urllib.parse.urlparse(url)
    assert parsed.scheme == "file", f"expected a file:// URL on ext, got {url}"
    path = urllib.parse.unquote(parsed.path)
    assert vhd.read(path, 0, K4) == pat("url0")
    assert vhd.read(path, BLOCK, K4) == pat("url1")


def test_copy_to_another_sr(ext: Ext, make_sr: SrFactory, tmp_path: Path) -> None:
    from smcommon import vhd

    src = make_sr.make()
    dst = make_sr.make()
    v = src.create("orig", 8 * MiB, name_description="to copy")["vdi"]
    src.write(v, {0: pat("c0"), 3 * BLOCK: pat("c3")})
    src.snapshot(v)
    src.write(v, {BLOCK: pat("c1")})
    new = src.ok("VDI.copy", vdi=v, url="", dest=dst.uuid)
    assert isinstance(new, str) and new
    assert new in dst.scan()
    st = dst.ok("VDI.stat", vdi=new)
    assert st["virtual_size"] == src.ok("VDI.stat", vdi=v)["virtual_size"]
    with src.opened(v) as p1, dst.opened(new) as p2:
        vhd.export_raw(p1, str(tmp_path / "a.raw"))
        vhd.export_raw(p2, str(tmp_path / "b.raw"))
    assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()
    # the source is untouched
    assert src.read(v, [(BLOCK, K4)]) == [pat("c1")]
    dst.assert_consistent()
    # copy into an SR that is not attached
    dst.ok("SR.detach")
    err = src.err("VDI.copy", vdi=v, url="", dest=dst.uuid)
    assert err[0] in ("Sr_not_attached", "Backend_error"), err


# --- compose, similar_content ---------------------------------------------------------------


def test_compose(sr: SR) -> None:
    base = sr.create("base", 8 * MiB)["vdi"]
    sr.write(base, {0: pat("B0")})
    child = sr.clone(base)["vdi"]
    sr.write(child, {BLOCK: pat("child1")})  # the child's own update
    other = sr.create("other", 8 * MiB)["vdi"]
    sr.write(other, {0: pat("O0"), 2 * BLOCK: pat("O2")})
    sr.ok("VDI.compose", vdi1=other, vdi2=child)
    # child = other's content + child's own updates
    assert sr.read(child, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("O0"),
        pat("child1"),
        pat("O2"),
    ]
    # vdi1 unchanged
    assert sr.read(other, [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]) == [
        pat("O0"),
        b"\0" * K4,
        pat("O2"),
    ]
    assert sr.read(base, [(0, K4)]) == [pat("B0")]
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)


def test_compose_errors(sr: SR) -> None:
    a = sr.create("a")["vdi"]
    missing = str(uuid.uuid4())
    assert sr.err("VDI.compose", vdi1=a, vdi2=missing)[0] == "Vdi_does_not_exist"
    assert sr.err("VDI.compose", vdi1=missing, vdi2=a)[0] == "Vdi_does_not_exist"


def test_similar_content(sr: SR) -> None:
    a = sr.create("a")["vdi"]
    s1 = sr.snapshot(a)["vdi"]
    s2 = sr.snapshot(a)["vdi"]
    unrelated = sr.create("u")["vdi"]
    sim = [v["vdi"] for v in sr.ok("VDI.similar_content", vdi=a)]
    assert unrelated not in sim and a not in sim
    assert set(sim) == {s1, s2}
    # s2 shares the nearer parent with a: first
    assert sim[0] == s2
    assert sr.ok("VDI.similar_content", vdi=unrelated) == []


# --- vdi_info input handling ---------------------------------------------------------


def test_create_rejects_bad_sizes(sr: SR) -> None:
    for size in ("0", "-1", str(2**63)):
        err = sr.err("VDI.create", vdi_info=vinfo("bad", size))
        assert err[0] in ("Backend_error",) and any("size" in e for e in err), err
    assert sr.scan() == {}
