"""create / info / read / write / snapshot / chains / parent search (smcommon.vhd.image)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from smcommon import vhd
from smcommon.vhd import format as fmt
from smcommon.vhd import relayout
from smcommon.vhd.create import parent_locators
from smcommon.vhd.image import Image
from vhd_unit_helpers import BLOCK, MIB, apply, pattern


def test_create_dynamic_rounds_up_and_says_so(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    info = vhd.create(p, 5 * MIB + 1)
    assert info.virtual_size == 6 * MIB
    assert info.disk_type == "dynamic" and info.creator == "tap "
    assert info.block_size == BLOCK and info.max_blocks == 3 and info.allocated_blocks == 0
    assert info.depth == 1 and info.parent is None and not info.hidden
    raw = p.read_bytes()
    assert raw[:512] == raw[-512:]                      # footer copy at offset 0
    footer = fmt.Footer.from_bytes(raw[-512:])
    header = fmt.Header.from_bytes(raw[512:1536])
    assert header.table_offset == 1536                  # as libvhd lays it out
    batmap = fmt.BatmapHeader.from_bytes(raw[2048:2560])    # at the end of the BAT
    assert (batmap.batmap_offset, batmap.batmap_size) == (2560, 1)
    assert len(raw) == 2560 + 512 + 512 and footer.current_size == 6 * MIB


def test_create_fixed_is_raw_plus_footer(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    info = vhd.create(p, 4 * MIB, fixed=True)
    assert info.disk_type == "fixed" and os.path.getsize(p) == 4 * MIB + 512
    vhd.write(p, 3, b"abc")
    assert p.read_bytes()[3:6] == b"abc"
    assert vhd.read(p, 0, 8) == b"\0\0\0abc\0\0"


def test_create_too_large_leaves_no_file(tmp_path: Path) -> None:
    p = tmp_path / "big.vhd"
    with pytest.raises(vhd.TooLarge, match="2040 GiB"):
        vhd.create(p, vhd.MAX_VIRTUAL_SIZE + 1)
    assert list(tmp_path.iterdir()) == []


def test_create_max_size_is_metadata_only(tmp_path: Path) -> None:
    p = tmp_path / "m.vhd"
    info = vhd.create(p, vhd.MAX_VIRTUAL_SIZE)
    assert info.virtual_size == vhd.MAX_VIRTUAL_SIZE and os.path.getsize(p) < 5 * MIB
    q = tmp_path / "s.vhd"
    info = vhd.create(q, 4 * MIB, max_size=64 * MIB)
    assert info.virtual_size == 4 * MIB and info.max_blocks == 32


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "10G"])
def test_create_bad_size(tmp_path: Path, size: object) -> None:
    with pytest.raises(vhd.InvalidArgument):
        vhd.create(tmp_path / "x.vhd", size)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    p.write_bytes(b"precious")
    with pytest.raises(vhd.AlreadyExists):
        vhd.create(p, MIB)
    assert p.read_bytes() == b"precious"


def test_read_write_round_trip_unaligned_and_across_blocks(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    size = vhd.create(p, 10 * MIB).virtual_size
    model = bytearray(size)
    for seed, (off, n) in enumerate([(0, 1), (511, 2), (BLOCK - 100, 300), (3 * MIB + 7, 3 * MIB),
                                     (size - 5, 5), (4096, 4096)]):
        data = pattern(seed, n)
        vhd.write(p, off, data)
        apply(model, off, data)
    assert vhd.read(p, 0, size) == model
    assert vhd.read(p, BLOCK - 3, 10) == model[BLOCK - 3 : BLOCK + 7]
    assert vhd.check(p) == []


def test_read_write_bounds(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 2 * MIB)
    with pytest.raises(vhd.InvalidArgument, match="past the disk size"):
        vhd.read(p, 2 * MIB - 1, 2)
    with pytest.raises(vhd.InvalidArgument, match="past the disk size"):
        vhd.write(p, 2 * MIB, b"x")
    with pytest.raises(vhd.InvalidArgument, match="offset must be an integer"):
        vhd.read(p, "0", 1)  # type: ignore[arg-type]
    with pytest.raises(vhd.InvalidArgument, match="data must be bytes"):
        vhd.write(p, 0, "text")  # type: ignore[arg-type]
    with pytest.raises(vhd.NotFound):
        vhd.info(tmp_path / "nope.vhd")


def test_snapshot_chain_reads_through(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    size = vhd.create(base, 8 * MIB).virtual_size
    model = bytearray(size)
    data = pattern(1, 3 * MIB)
    vhd.write(base, MIB, data)
    apply(model, MIB, data)
    info = vhd.snapshot(base, leaf)
    assert info.disk_type == "differencing" and info.depth == 2
    assert info.parent_uuid == vhd.info(base).uuid
    assert os.path.samefile(info.parent or "", base)
    for seed, (off, n) in enumerate([(MIB + 3, 10), (2 * MIB - 1, 2), (6 * MIB, 4096)], 10):
        d = pattern(seed, n)
        vhd.write(leaf, off, d)
        apply(model, off, d)
    assert vhd.read(leaf, 0, size) == model
    assert vhd.read(base, MIB, 3 * MIB) == data            # the parent is untouched
    assert vhd.chain(leaf)[0] == str(leaf) and os.path.samefile(vhd.chain(leaf)[1], base)
    assert vhd.check(leaf) == [] and vhd.check(base) == []


def test_snapshot_writes_blktap_locators(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 2 * MIB)
    vhd.snapshot(base, leaf)
    raw = leaf.read_bytes()
    header = fmt.Header.from_bytes(raw[512:1536])
    locs = [loc for loc in header.locators if loc.used]
    assert [loc.code for loc in locs] == [b"W2ru", b"W2ku", b"MacX"]
    texts = [raw[loc.data_offset : loc.data_offset + loc.data_length] for loc in locs]
    # relative in all three, as libvhd writes them (the corpus shows the same)
    assert texts[0].decode("utf-16-le") == ".\\base.vhd"
    assert texts[1].decode("utf-16-le") == ".\\base.vhd"
    assert texts[2] == b"file://./base.vhd"
    assert all(loc.data_space == 1 and loc.space == 512 for loc in locs)    # in sectors
    assert all(loc.data_offset < header.table_offset for loc in locs)  # before the BAT
    parent_footer = fmt.Footer.from_bytes(base.read_bytes()[-512:])
    assert header.parent_timestamp == parent_footer.timestamp
    assert header.parent_uuid == parent_footer.uuid


def test_parent_found_relative_after_moving_the_pair(tmp_path: Path) -> None:
    a, b = tmp_path / "one", tmp_path / "two"
    a.mkdir()
    vhd.create(a / "base.vhd", 2 * MIB)
    vhd.write(a / "base.vhd", 0, b"base")
    vhd.snapshot(a / "base.vhd", a / "leaf.vhd")
    a.rename(b)                                         # W2KU/MACX are stale now
    assert vhd.read(b / "leaf.vhd", 0, 4) == b"base"


def test_parent_missing_and_mismatch(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 2 * MIB)
    vhd.snapshot(base, leaf)
    base.unlink()
    with pytest.raises(vhd.ParentMissing, match="not found"):
        vhd.info(leaf)
    vhd.create(base, 2 * MIB)                            # same name, another UUID
    with pytest.raises(vhd.ParentMismatch, match="UUID"):
        vhd.read(leaf, 0, 1)
    assert any("UUID" in p for p in vhd.check(leaf))


def test_parent_outside_the_allowed_dirs_is_never_opened(tmp_path: Path) -> None:
    outside, sr = tmp_path / "outside", tmp_path / "sr"
    outside.mkdir()
    sr.mkdir()
    vhd.create(outside / "base.vhd", 2 * MIB)
    with pytest.raises(vhd.ParentNotAllowed):
        vhd.snapshot(outside / "base.vhd", sr / "leaf.vhd")
    assert not (sr / "leaf.vhd").exists()
    # allowed explicitly: then a later open must pass the same search_dirs
    vhd.snapshot(outside / "base.vhd", sr / "leaf.vhd", search_dirs=[str(sr), str(outside)])
    with pytest.raises(vhd.ParentNotAllowed, match="outside the allowed"):
        vhd.info(sr / "leaf.vhd")
    assert vhd.info(sr / "leaf.vhd", search_dirs=[str(sr), str(outside)]).depth == 2


def test_parent_through_symlink_out_of_dir_refused(tmp_path: Path) -> None:
    outside, sr = tmp_path / "outside", tmp_path / "sr"
    outside.mkdir()
    sr.mkdir()
    vhd.create(sr / "base.vhd", 2 * MIB)
    vhd.snapshot(sr / "base.vhd", sr / "leaf.vhd")
    os.replace(sr / "base.vhd", outside / "base.vhd")
    os.symlink(outside / "base.vhd", sr / "base.vhd")
    with pytest.raises(vhd.ParentNotAllowed):
        vhd.info(sr / "leaf.vhd")


def _point_parent_at(child: Path, parent: Path) -> None:
    """Re-link ``child`` to ``parent`` bypassing set_parent's loop check."""
    pfooter = fmt.Footer.from_bytes(parent.read_bytes()[-512:])
    with Image.open(child, writable=True, parents=False) as img:
        name, payloads = parent_locators(str(child), str(parent))
        relayout.relink(img, pfooter, name, payloads)


def test_parent_loop_is_an_error(tmp_path: Path) -> None:
    base, x, y = tmp_path / "base.vhd", tmp_path / "x.vhd", tmp_path / "y.vhd"
    vhd.create(base, 2 * MIB)
    vhd.snapshot(base, x)
    vhd.snapshot(base, y)
    vhd.set_parent(x, y)                                 # x -> y -> base
    with pytest.raises(vhd.ParentLoop):
        vhd.set_parent(y, x)                             # refused: y -> x -> y
    _point_parent_at(y, x)                               # forced on disk
    with pytest.raises(vhd.ParentLoop, match="loop"):
        vhd.info(x)
    assert any("loop" in p for p in vhd.check(y))


def test_chain_depth_is_bounded(tmp_path: Path) -> None:
    prev = tmp_path / "d0.vhd"
    vhd.create(prev, 2 * MIB)
    for i in range(1, 64):                              # d63 is the 64th image
        cur = tmp_path / f"d{i}.vhd"
        vhd.snapshot(prev, cur)
        prev = cur
    assert vhd.info(prev).depth == 64
    with pytest.raises(vhd.ChainTooDeep):
        vhd.snapshot(prev, tmp_path / "d64.vhd")


def test_set_hidden_updates_both_footers(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 2 * MIB)
    vhd.set_hidden(p, True)
    raw = p.read_bytes()
    assert raw[85] == 1 and raw[-512 + 85] == 1 and raw[:512] == raw[-512:]
    assert vhd.info(p).hidden and vhd.check(p) == []
    vhd.set_hidden(p, False)
    assert not vhd.info(p).hidden


def test_image_object_keeps_fds_for_many_io(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    with Image.open(p, writable=True) as img:
        for i in range(16):
            img.write(i * 300_000, bytes([i]) * 1000)
        assert img.read(15 * 300_000, 1000) == bytes([15]) * 1000
    with Image.open(p) as img, pytest.raises(vhd.ReadOnly):
        img.write(0, b"x")


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", range(1, 9))
def test_allocation_interrupted_at_each_step_stays_sound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at: int
) -> None:
    """Cut a write that allocates blocks after N syscalls: check passes, acked data stays."""
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    vhd.write(p, 0, b"acked" * 1000)
    calls = {"n": 0}
    real_pwrite, real_pwritev, real_sync = os.pwrite, os.pwritev, os.fdatasync

    def counted(real):  # type: ignore[no-untyped-def]
        def wrapper(*a):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise _Killed()
            return real(*a)
        return wrapper

    monkeypatch.setattr(os, "pwrite", counted(real_pwrite))
    monkeypatch.setattr(os, "pwritev", counted(real_pwritev))
    monkeypatch.setattr(os, "fdatasync", counted(real_sync))
    with pytest.raises(_Killed):
        vhd.write(p, 3 * MIB, pattern(3, 3 * MIB))
    monkeypatch.undo()
    assert vhd.check(p) == []
    assert vhd.read(p, 0, 5000) == b"acked" * 1000


def test_create_falls_back_when_linkat_through_proc_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some kernels/mounts refuse linkat(/proc/self/fd/N): the image is copied, not lost."""
    real_link = os.link

    def refusing(src: str, dst: str, **kw: object) -> None:
        if str(src).startswith("/proc/self/fd/"):
            raise OSError(18, "Invalid cross-device link")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", refusing)
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    monkeypatch.undo()
    vhd.write(p, 3 * MIB, b"data")
    assert vhd.read(p, 3 * MIB, 4) == b"data" and vhd.check(p) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.vhd"]


def test_a_leaf_opened_through_a_symlink_finds_its_parent_next_to_the_file(tmp_path: Path) -> None:
    sr, elsewhere = tmp_path / "sr", tmp_path / "elsewhere"
    sr.mkdir()
    elsewhere.mkdir()
    vhd.create(sr / "base.vhd", 2 * MIB)
    vhd.write(sr / "base.vhd", 0, b"base")
    vhd.snapshot(sr / "base.vhd", sr / "leaf.vhd")
    os.symlink(sr / "leaf.vhd", elsewhere / "link.vhd")
    vhd.create(elsewhere / "base.vhd", 2 * MIB)          # a decoy beside the link
    assert vhd.read(elsewhere / "link.vhd", 0, 4) == b"base"
    assert os.path.samefile(vhd.chain(elsewhere / "link.vhd")[1], sr / "base.vhd")
