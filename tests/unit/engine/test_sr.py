"""SrEngine: VDI create/stat/scan/destroy, snapshot and clone trees, epochs,
compose, similar_content, on real VHD images in a tmp SR."""

from __future__ import annotations

import errno
import os

import pytest
from engine_helpers import BLOCK, K4, MiB, hidden_volumes, pat, read, write
from smcommon.engine.sr import SrEngine
from smcommon.errors import BackendError, InvalidRequest, VdiDoesNotExist

ZERO = b"\0" * K4


def new(eng: SrEngine, name: str = "d", size: int = 8 * MiB, **kw: object) -> str:
    return str(eng.create({"name_label": name, "virtual_size": size, **kw})["vdi"])


def test_create_rounds_up_and_stat_scan_agree(eng: SrEngine) -> None:
    info = eng.create(
        {"name_label": "d0", "virtual_size": 3 * MiB + 1, "sm_config": {"a": "b"}}
    )
    assert info["virtual_size"] == 4 * MiB
    assert info["sm_config"] == {"a": "b", "vdi_type": "vhd"}
    assert info["content_id"]
    assert info["persistent"] is True and info["is_a_snapshot"] is False
    assert eng.stat(info["vdi"]) == info
    assert eng.scan() == [info]
    assert eng.get_by_name("d0")["vdi"] == info["vdi"]
    # the leaf is named after the VDI
    assert eng.store.path(eng.get(info["vdi"]).volume).endswith(info["vdi"] + ".vhd")


@pytest.mark.parametrize("size", [0, -1, True, "10", None])
def test_create_refuses_bad_sizes(eng: SrEngine, size: object) -> None:
    with pytest.raises(InvalidRequest, match="virtual_size"):
        eng.create({"name_label": "x", "virtual_size": size})
    assert eng.scan() == []


def test_unknown_and_hostile_vdis(eng: SrEngine) -> None:
    with pytest.raises(VdiDoesNotExist):
        eng.stat("no-such-vdi")
    for bad in ("../x", "a/b", "", "x\x00y", "." * 3, "a" * 200):
        with pytest.raises(InvalidRequest):
            eng.stat(bad)
    with pytest.raises(VdiDoesNotExist):
        eng.get_by_name("nobody")


def test_snapshot_tree_and_data(eng: SrEngine) -> None:
    v = new(eng, "orig")
    write(eng, v, {0: pat("old0")})
    snap = eng.snapshot({"vdi": v, "name_description": "by test"})
    s = snap["vdi"]
    assert snap["is_a_snapshot"] is True and snap["snapshot_of"] == v
    assert snap["snapshot_time"] and snap["name_label"] == "orig"
    assert snap["name_description"] == "by test"
    assert snap["content_id"] == eng.stat(v)["content_id"]
    write(eng, v, {0: pat("new0")})
    write(eng, s, {BLOCK: pat("snap1")})
    assert read(eng, v, [0, BLOCK]) == [pat("new0"), ZERO]
    assert read(eng, s, [0, BLOCK]) == [pat("old0"), pat("snap1")]
    tree = eng.store.tree()
    base = tree[eng.get(v).volume].parent
    assert base is not None and tree[base].hidden
    assert tree[eng.get(s).volume].parent == base
    assert {i["vdi"] for i in eng.scan()} == {v, s}
    # the VDI kept its leaf name: an attach made before still names it
    assert eng.get(v).volume == v


def test_clone_is_not_a_snapshot(eng: SrEngine) -> None:
    v = new(eng)
    c = eng.clone({"vdi": v})
    assert (
        c["is_a_snapshot"] is False
        and c["snapshot_of"] == ""
        and c["snapshot_time"] == ""
    )


def test_snapshot_cost_does_not_depend_on_data(eng: SrEngine) -> None:
    v = new(eng, size=64 * MiB)
    write(eng, v, {i * BLOCK: pat(f"b{i}", K4) for i in range(16)})

    def inodes() -> dict[int, int]:
        return {
            p.stat().st_ino: p.stat().st_blocks * 512 for p in eng.sr_dir.glob("*.vhd")
        }

    before = inodes()
    eng.snapshot({"vdi": v})
    after = inodes()
    # nothing copied: the data stays in its image (now the base, under a
    # second name); the two new images (the VDI's and the snapshot's leaf) are
    # small and the same whatever the data
    fresh = [after[i] for i in set(after) - set(before)]
    assert len(fresh) == 2 and all(n < 256 * 1024 for n in fresh), fresh
    assert len(after) == 3


def test_destroy_collects_garbage(eng: SrEngine) -> None:
    v = new(eng)
    write(eng, v, {0: pat("x")})
    s = eng.snapshot({"vdi": v})["vdi"]
    write(eng, v, {BLOCK: pat("y")})
    eng.destroy(s)
    assert hidden_volumes(eng) == []
    assert sorted(eng.store.volumes()) == [v]
    assert read(eng, v, [0, BLOCK]) == [pat("x"), pat("y")]
    eng.destroy(v)
    assert eng.store.volumes() == [] and eng.scan() == []
    with pytest.raises(VdiDoesNotExist):
        eng.destroy(v)


def test_destroy_of_an_attached_vdi_is_refused(eng: SrEngine) -> None:
    from smcommon.engine import vdipath

    v = new(eng)
    vdipath.attach(eng, "vm1", v, True)
    with pytest.raises(BackendError, match="VDI_IN_USE"):
        eng.destroy(v)
    vdipath.detach(eng, "vm1", v)
    eng.destroy(v)


def test_metadata_changes(eng: SrEngine) -> None:
    v = new(eng)
    eng.set_content_id(v, "cid-1")
    assert eng.stat(v)["content_id"] == "cid-1"
    eng.set_persistent(v, True)
    assert eng.stat(v)["persistent"] is True


def test_non_persistent_epochs(eng: SrEngine) -> None:
    v = new(eng)
    write(eng, v, {0: pat("keep")})
    eng.set_persistent(v, False)
    assert eng.stat(v)["persistent"] is False
    for epoch in range(3):
        eng.epoch_begin(v)
        assert read(eng, v, [0, BLOCK]) == [pat("keep"), ZERO]
        write(eng, v, {0: pat(f"e{epoch}"), BLOCK: pat(f"f{epoch}")})
        eng.epoch_end(v)
    # the base survives a collection
    from smcommon.engine.gc import Collector

    with eng.tree_lock():
        Collector(eng).run()
    eng.epoch_begin(v)
    assert read(eng, v, [0, BLOCK]) == [pat("keep"), ZERO]
    # persistent again: the current content stays
    write(eng, v, {0: pat("last")})
    eng.set_persistent(v, True)
    eng.epoch_begin(v)
    assert read(eng, v, [0]) == [pat("last")]
    with eng.tree_lock():
        Collector(eng).run()
    assert hidden_volumes(eng) == []
    assert read(eng, v, [0]) == [pat("last")]


def test_create_non_persistent(eng: SrEngine) -> None:
    v = new(eng, persistent=False)
    assert eng.stat(v)["persistent"] is False
    write(eng, v, {0: pat("gone")})
    eng.epoch_begin(v)
    assert read(eng, v, [0]) == [ZERO]


def test_compose(eng: SrEngine) -> None:
    base = new(eng, "base")
    write(eng, base, {0: pat("B0")})
    child = eng.clone({"vdi": base})["vdi"]
    write(eng, child, {BLOCK: pat("c1")})
    other = new(eng, "other")
    write(eng, other, {0: pat("O0"), 2 * BLOCK: pat("O2")})
    eng.compose(other, child)
    assert read(eng, child, [0, BLOCK, 2 * BLOCK]) == [pat("O0"), pat("c1"), pat("O2")]
    assert read(eng, other, [0, BLOCK, 2 * BLOCK]) == [pat("O0"), ZERO, pat("O2")]
    assert read(eng, base, [0]) == [pat("B0")]
    with pytest.raises(InvalidRequest):
        eng.compose(other, other)


def test_similar_content_nearest_first(eng: SrEngine) -> None:
    a = new(eng, "a")
    s1 = eng.snapshot({"vdi": a})["vdi"]
    s2 = eng.snapshot({"vdi": a})["vdi"]
    u = new(eng, "u")
    assert [i["vdi"] for i in eng.similar_content(a)] == [s2, s1]
    assert eng.similar_content(u) == []


def test_get_url_reads_the_whole_chain(eng: SrEngine) -> None:
    import urllib.parse

    from smcommon import vhd

    v = new(eng)
    write(eng, v, {0: pat("u0")})
    eng.snapshot({"vdi": v})
    write(eng, v, {BLOCK: pat("u1")})
    url = eng.get_url(v)
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    assert url.startswith("file://")
    assert vhd.read(path, 0, K4) == pat("u0") and vhd.read(path, BLOCK, K4) == pat("u1")


def test_scan_of_many_vdis_reads_records_only(
    eng: SrEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        new(eng, f"d{i}")

    def boom(*a: object) -> None:
        raise AssertionError("SR.scan opened a VHD")

    monkeypatch.setattr(eng.store, "info", boom)
    assert len(eng.scan()) == 20


def test_snapshot_of_an_image_held_by_a_writer_is_refused_at_once(
    eng: SrEngine,
) -> None:
    from smcommon.vhd.image import Image

    v = new(eng)
    # refused by the engine's probe (VDI_IN_USE), not by the image lock's
    # long wait (VHD_BUSY)
    with (
        Image.open(eng.store.path(v), writable=True),
        pytest.raises(BackendError, match="VDI_IN_USE.*open for writing"),
    ):
        eng.snapshot({"vdi": v})
    assert {i["vdi"] for i in eng.scan()} == {v}
    eng.snapshot({"vdi": v})  # released: fine


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.EIO, "SR_IO_ERROR"),
        (errno.ENOSPC, "SR_FULL"),
        (errno.EROFS, "SR_READ_ONLY"),
    ],
)
def test_io_errors_while_saving_metadata_name_the_sr_and_the_step(
    eng: SrEngine, monkeypatch: pytest.MonkeyPatch, err: int, code: str
) -> None:
    """EIO/ENOSPC/EROFS while a record is saved: Backend_error naming the SR
    and the step; the old record stays, no temp file is left."""
    v = new(eng)
    before = eng.stat(v)
    real = os.replace

    def failing(src: object, dst: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(BackendError) as info:
        eng.set_content_id(v, "new-content")
    with pytest.raises(BackendError) as info2:
        eng.create({"name_label": "n", "virtual_size": MiB})
    monkeypatch.setattr(os, "replace", real)
    for e, step in ((info.value, "content_id"), (info2.value, "record of new VDI")):
        assert e.code == code
        assert eng.sr in e.details[0] and step in e.details[0], e.details
        assert os.strerror(err) in e.details[0]
    assert eng.stat(v) == before
    assert [r.vdi for r in eng.meta.records()] == [v]
    assert eng.store.volumes() == [v]  # the failed create left no volume
    leftovers = [p for p in eng.meta.sm_dir.rglob(".*.tmp")]
    assert leftovers == []
