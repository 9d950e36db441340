"""set_parent, coalesce, resize, check, repair, export/import/convert, allocation map."""

from __future__ import annotations

import itertools
import os
import struct
from pathlib import Path

import pytest
from smcommon import vhd
from smcommon.vhd import format as fmt
from vhd_unit_helpers import BLOCK, MIB, apply, pattern


def _chain(tmp_path: Path) -> tuple[Path, Path, bytearray]:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    size = vhd.create(base, 12 * MIB).virtual_size
    model = bytearray(size)
    for seed, off in enumerate([0, 5 * MIB + 3]):
        d = pattern(seed, MIB)
        vhd.write(base, off, d)
        apply(model, off, d)
    vhd.snapshot(base, leaf)
    for seed, (off, n) in enumerate([(100, 10), (4 * MIB, BLOCK), (9 * MIB + 512, 4096)], 20):
        d = pattern(seed, n)
        vhd.write(leaf, off, d)
        apply(model, off, d)
    return base, leaf, model


def test_coalesce_copies_only_the_child_sectors_and_is_rerunnable(tmp_path: Path) -> None:
    base, leaf, model = _chain(tmp_path)
    leaf_before = leaf.read_bytes()
    copied = vhd.coalesce(leaf)
    assert copied == 512 + BLOCK + 4096               # whole sectors the child holds
    assert vhd.read(base, 0, len(model)) == model
    assert leaf.read_bytes() == leaf_before            # the child is untouched
    assert vhd.coalesce(leaf) == copied                # again: same result
    assert vhd.read(base, 0, len(model)) == model
    assert vhd.check(base) == [] and vhd.check(leaf) == []


def test_coalesce_grows_a_smaller_parent(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 2 * MIB)
    vhd.snapshot(base, leaf)
    vhd.resize(leaf, 8 * MIB)
    vhd.write(leaf, 7 * MIB, b"tail")
    vhd.coalesce(leaf)
    assert vhd.info(base).virtual_size == 8 * MIB
    assert vhd.read(base, 7 * MIB, 4) == b"tail"


def test_coalesce_needs_a_parent(tmp_path: Path) -> None:
    vhd.create(tmp_path / "a.vhd", 2 * MIB)
    with pytest.raises(vhd.Unsupported, match="no parent"):
        vhd.coalesce(tmp_path / "a.vhd")


def test_set_parent_relinks(tmp_path: Path) -> None:
    base, leaf, model = _chain(tmp_path)
    copy = tmp_path / "copy.vhd"
    vhd.convert(base, copy)                            # same content, new UUID
    vhd.set_parent(leaf, copy)
    assert os.path.samefile(vhd.chain(leaf)[1], copy)
    assert vhd.info(leaf).parent_uuid == vhd.info(copy).uuid
    assert vhd.read(leaf, 0, len(model)) == model
    assert vhd.check(leaf) == []


def test_set_parent_refuses_non_differencing_and_missing(tmp_path: Path) -> None:
    base, leaf, _ = _chain(tmp_path)
    with pytest.raises(vhd.Unsupported):
        vhd.set_parent(base, leaf)
    with pytest.raises(vhd.NotFound):
        vhd.set_parent(leaf, tmp_path / "nope.vhd")


def test_resize_grow_within_bat_is_metadata_only(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 4 * MIB, max_size=64 * MIB)
    vhd.write(p, 0, b"keep")
    size_before = os.path.getsize(p)
    info = vhd.resize(p, 60 * MIB + 1)
    assert info.virtual_size == 62 * MIB and os.path.getsize(p) == size_before
    assert vhd.read(p, 0, 4) == b"keep" and vhd.check(p) == []


def test_resize_grow_relocates_blocks_for_a_bigger_bat(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    size = vhd.create(p, 8 * MIB).virtual_size
    model = bytearray(size)
    for b in range(4):
        d = pattern(b, BLOCK)
        vhd.write(p, b * BLOCK, d)
        apply(model, b * BLOCK, d)
    info = vhd.resize(p, 100 * 2**30)                  # 51200 entries: 200 KiB of BAT
    assert info.virtual_size == 100 * 2**30 and info.max_blocks == 51200
    assert vhd.check(p) == []
    assert vhd.read(p, 0, size) == model
    assert vhd.read(p, 100 * 2**30 - 10, 10) == bytes(10)
    vhd.write(p, 99 * 2**30, b"far")
    assert vhd.read(p, 99 * 2**30, 3) == b"far"


def test_resize_differencing_grows_too(tmp_path: Path) -> None:
    _base, leaf, model = _chain(tmp_path)
    vhd.resize(leaf, 20 * 2**30)
    assert vhd.read(leaf, 0, len(model)) == model
    assert vhd.check(leaf) == []


def test_resize_shrink(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 10 * MIB)
    vhd.write(p, 5 * MIB, b"x")
    with pytest.raises(vhd.DataBeyondEnd, match="beyond the new end"):
        vhd.resize(p, 4 * MIB)
    assert vhd.resize(p, 6 * MIB).virtual_size == 6 * MIB
    assert vhd.read(p, 5 * MIB, 1) == b"x"


def test_resize_fixed(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    vhd.create(p, 4 * MIB, fixed=True)
    vhd.write(p, 4 * MIB - 1, b"z")
    vhd.resize(p, 8 * MIB)
    assert os.path.getsize(p) == 8 * MIB + 512 and vhd.check(p) == []
    assert vhd.read(p, 4 * MIB - 1, 600) == b"z" + bytes(599)   # old footer zeroed
    with pytest.raises(vhd.DataBeyondEnd):
        vhd.resize(p, 2 * MIB)
    vhd.resize(p, 4 * MIB)
    assert os.path.getsize(p) == 4 * MIB + 512 and vhd.check(p) == []


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _reseal_header(path: Path, **changes: int) -> None:
    raw = path.read_bytes()
    header = fmt.Header.from_bytes(raw[512:1536]).sealed(**changes)
    _poke(path, 512, header.to_bytes())


def test_check_finds_each_problem(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    vhd.write(p, 0, b"a")
    vhd.write(p, 2 * MIB, b"b")
    assert vhd.check(p) == []
    size = os.path.getsize(p)
    _poke(p, size - 512 + 100, b"\x01")               # tail footer checksum
    assert any("tail footer: bad checksum" in x for x in vhd.check(p))
    vhd.repair(p)
    _poke(p, 0, b"X")                                   # head cookie
    assert any("bad cookie" in x for x in vhd.check(p))
    vhd.repair(p)
    assert vhd.check(p) == []
    bat_at = 1536
    _poke(p, bat_at + 4, struct.pack(">I", 0x7FFFFFF0))  # entry 1 past EOF
    assert any("past the end" in x for x in vhd.check(p))
    with pytest.raises(vhd.Corrupt, match="past the end"):
        vhd.read(p, 0, 1)
    first = struct.unpack(">I", p.read_bytes()[bat_at : bat_at + 4])[0]
    _poke(p, bat_at + 4, struct.pack(">I", first + 1))  # entry 1 overlaps entry 0
    assert any("overlap" in x for x in vhd.check(p))
    _poke(p, bat_at + 4, struct.pack(">I", 2))          # entry 1 on the header
    assert any("overlaps the dynamic header" in x for x in vhd.check(p))


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"block_size": 3 * MIB}, "power of two"), ({"max_table_entries": 2**31}, "max table entries"),
     ({"table_offset": 2**40}, "outside the file"), ({"max_table_entries": 1}, "cannot map")],
)
def test_check_and_open_refuse_absurd_headers(tmp_path: Path, changes: dict[str, int],
                                              message: str) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    _reseal_header(p, **changes)
    assert any(message in x for x in vhd.check(p))
    with pytest.raises(vhd.Corrupt, match=message):
        vhd.info(p)


def test_check_truncated_and_tiny_files(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    vhd.write(p, 0, pattern(1, MIB))
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 1000)
    assert vhd.check(p) != []
    with pytest.raises(vhd.VhdError):
        vhd.read(p, 0, MIB)
    with open(p, "r+b") as f:
        f.truncate(100)
    with pytest.raises(vhd.Corrupt, match="too small"):
        vhd.check(p)


def test_repair_restores_the_tail_from_the_head(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 8 * MIB)
    vhd.write(p, 0, b"data")
    size = os.path.getsize(p)
    _poke(p, size - 512, bytes(512))
    assert vhd.read(p, 0, 4) == b"data"                # read through the head copy
    with pytest.raises(vhd.Corrupt, match="repair"):
        vhd.write(p, 0, b"x")
    done = vhd.repair(p)
    assert done and "tail footer" in done[0]
    assert vhd.check(p) == [] and vhd.repair(p) == []
    _poke(p, 0, bytes(512))
    _poke(p, size - 512, bytes(512))
    with pytest.raises(vhd.Corrupt, match="both footers"):
        vhd.repair(p)


def test_export_import_convert_round_trip(tmp_path: Path) -> None:
    _base, leaf, model = _chain(tmp_path)
    raw = tmp_path / "disk.raw"
    vhd.export_raw(leaf, raw)
    assert raw.read_bytes() == model
    imported = vhd.import_raw(raw, tmp_path / "imp.vhd")
    assert imported.virtual_size == len(model)
    # blocks 0, 2, 3 (3 bytes at 6M), 4 hold data; 1 and 5 are zeros and stay unallocated
    assert imported.allocated_blocks == 4
    assert vhd.read(tmp_path / "imp.vhd", 0, len(model)) == model
    flat = vhd.convert(leaf, tmp_path / "flat.vhd")
    assert flat.depth == 1 and flat.disk_type == "dynamic" and flat.allocated_blocks == 4
    assert vhd.read(tmp_path / "flat.vhd", 0, len(model)) == model
    fixed = vhd.import_raw(raw, tmp_path / "fix.vhd", fixed=True)
    assert fixed.disk_type == "fixed"
    assert vhd.read(tmp_path / "fix.vhd", 0, len(model)) == model
    vhd.export_raw(tmp_path / "fix.vhd", tmp_path / "again.raw")
    assert (tmp_path / "again.raw").read_bytes() == model
    for name in ("imp.vhd", "flat.vhd", "fix.vhd"):
        assert vhd.check(tmp_path / name) == []


def test_import_rounds_odd_sizes_and_refuses_empty(tmp_path: Path) -> None:
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\x01" * 1000)
    info = vhd.import_raw(raw, tmp_path / "odd.vhd")
    assert info.virtual_size == BLOCK
    assert vhd.read(tmp_path / "odd.vhd", 0, 1001) == b"\x01" * 1000 + b"\0"
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(vhd.InvalidArgument, match="empty"):
        vhd.import_raw(tmp_path / "empty.raw", tmp_path / "e.vhd")
    assert not (tmp_path / "e.vhd").exists()


def test_allocation_map_by_depth(tmp_path: Path) -> None:
    base, leaf, model = _chain(tmp_path)
    extents = vhd.allocation_map(leaf)
    assert extents[0] == (0, 512, 1)                   # the child's sector at 100
    assert extents[1] == (512, BLOCK - 512, 2)         # the rest of base's block 0
    assert (4 * MIB, BLOCK, 1) in extents
    assert sum(n for _, n, _ in extents) == len(model)
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(extents))
    # every byte outside depth-0 extents may be data; inside them it reads as zeros
    for off, n, depth in extents:
        if depth == 0:
            assert model[off : off + n] == bytes(n)
    assert vhd.allocation_map(base)[0] == (0, BLOCK, 1)


def test_export_onto_an_image_of_the_chain_is_refused(tmp_path: Path) -> None:
    base, leaf, _model = _chain(tmp_path)
    before = base.read_bytes()
    with pytest.raises(vhd.InvalidArgument, match="chain being exported"):
        vhd.export_raw(leaf, base)
    assert base.read_bytes() == before


def test_a_stale_footer_copy_is_healed_not_reported(tmp_path: Path) -> None:
    """A metadata update killed between the tail and the head footer writes."""
    p = tmp_path / "a.vhd"
    vhd.create(p, 4 * MIB)
    head = p.read_bytes()[:512]
    vhd.set_hidden(p, True)
    _poke(p, 0, head)                                  # the head copy as before the update
    assert vhd.check(p) == [] and vhd.info(p).hidden
    vhd.write(p, 0, b"x")                              # a writable open heals it
    raw = p.read_bytes()
    assert raw[:512] == raw[-512:]
    other = fmt.Footer.from_bytes(head).sealed(uuid=bytes(16)).to_bytes()
    _poke(p, 0, other)                                 # not a copy of this image at all
    assert any("not a copy" in x for x in vhd.check(p))
    assert vhd.repair(p) and vhd.check(p) == []
