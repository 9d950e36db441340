"""blktap's batmap and libvhd's locator rule (smcommon.vhd.batmap, format, check).

Every dynamic or differencing image carries a batmap exactly as libvhd
expects it (header at the end of the padded BAT, cookie, version 1.2, map
after it, checksum over the part the disk size covers); every operation keeps
it right (a bit only for a block whose bitmap is all ones); ``check`` reports
what libvhd refuses and ``repair`` rebuilds it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import vhdcorpus as vc
from smcommon import vhd
from smcommon.vhd import format as fmt
from smcommon.vhd.image import Image
from vhd_unit_helpers import BLOCK, MIB, pattern


def batmap_of(path: Path) -> tuple[fmt.Header, fmt.BatmapHeader, bytes]:
    raw = path.read_bytes()
    header = fmt.Header.from_bytes(raw[512:1536])
    at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    bh = fmt.BatmapHeader.from_bytes(raw[at : at + 512])
    return header, bh, raw[bh.batmap_offset : bh.batmap_offset + bh.batmap_size * 512]


def full_blocks(path: Path) -> list[int]:
    return fmt.batmap_blocks(batmap_of(path)[2])


def test_batmap_format_reads_blktaps_own(corpus: Path) -> None:
    raw = (corpus / "base.vhd").read_bytes()
    bh = fmt.BatmapHeader.from_bytes(raw[2048:2560])
    assert bh.to_bytes() == raw[2048:2560]                   # byte for byte
    assert (bh.batmap_offset, bh.batmap_size, bh.version) == (2560, 1, 0x00010002)
    bits = raw[2560:3072]
    assert fmt.batmap_checksum(bits, 64 * MIB, bh.version) == bh.checksum == 0xFFFFFF7F
    assert fmt.batmap_blocks(bits) == [0]
    assert full_blocks(corpus / "grandchild.vhd") == [10]    # 0x20 in byte 1
    with pytest.raises(vhd.Corrupt, match="cookie"):
        fmt.BatmapHeader.from_bytes(b"\xff" * 512)


def test_batmap_sizes_and_checksum_extent() -> None:
    assert [fmt.batmap_sectors(n) for n in (1, 32, 4096, 4097, 1044480)] == [1, 1, 1, 2, 255]
    # libvhd sums (current_size >> 24) bytes rounded up to sectors, at least one
    assert fmt.batmap_checksum_len(64 * MIB) == 512
    assert fmt.batmap_checksum_len(8 * 1024 * MIB + 16 * MIB) == 1024
    bits = bytearray(1024)
    bits[600] = 0x80                                         # past a small disk's extent
    assert fmt.batmap_checksum(bits, 64 * MIB, fmt.BATMAP_VERSION) == 0xFFFFFFFF
    bits[0] = 0xFF                     # version 1.1 sums signed chars: 0xFF counts -1
    assert fmt.batmap_checksum(bits, 64 * MIB, fmt.BATMAP_VERSION_1_1) == 0
    assert fmt.batmap_checksum(bits, 64 * MIB, fmt.BATMAP_VERSION) == (~0xFF) & 0xFFFFFFFF


@pytest.mark.parametrize(("space", "nbytes"), [
    (1, 512), (16, 8192), (511, 511 * 512), (512, 512), (1024, 1024), (8192, 8192),
    (0, None), (513, None), (700, None),
])
def test_locator_space_follows_libvhd(space: int, nbytes: int | None) -> None:
    assert fmt.locator_space(space) == nbytes


@pytest.mark.parametrize("name", ["empty.vhd", "prealloc.vhd"])
def test_create_lays_out_exactly_like_vhd_util(corpus: Path, tmp_path: Path, name: str) -> None:
    """Same metadata, same places, same file size as blktap's own images (only
    the UUID, timestamps and checksums differ)."""
    ours = tmp_path / name
    vhd.create(ours, 64 * MIB, max_size=2048 * MIB if name == "prealloc.vhd" else None)
    theirs = (corpus / name).read_bytes()
    mine = ours.read_bytes()
    assert len(mine) == len(theirs) == vc.entry(name)["physical_size"]
    h1, b1, m1 = batmap_of(ours)
    h2, b2, m2 = batmap_of(corpus / name)
    assert (h1.table_offset, h1.max_table_entries) == (h2.table_offset, h2.max_table_entries)
    assert (b1.batmap_offset, b1.batmap_size, b1.version, b1.checksum, b1.rest) == \
        (b2.batmap_offset, b2.batmap_size, b2.version, b2.checksum, b2.rest)
    assert m1 == m2 == bytes(512)
    table = slice(h1.table_offset, h1.table_offset + 4 * h1.max_table_entries)
    assert mine[table] == theirs[table]
    assert vhd.check(ours) == []


def test_snapshot_has_an_empty_batmap_after_its_bat(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 10 * MIB)
    vhd.write(base, 0, pattern(1, BLOCK))
    vhd.snapshot(base, leaf)
    header, bh, bits = batmap_of(leaf)
    assert bh.batmap_offset == fmt.batmap_header_offset(header.table_offset, 5) + 512
    assert fmt.batmap_blocks(bits) == [] and full_blocks(base) == [0]
    assert vhd.check(leaf) == [] and vhd.check(base) == []


def test_write_sets_a_bit_only_when_the_block_becomes_full(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 16 * MIB)
    vhd.write(base, 3 * BLOCK + 7, b"x")       # a dynamic block is whole once allocated
    assert full_blocks(base) == [3]
    vhd.snapshot(base, leaf)
    vhd.write(leaf, 0, pattern(2, BLOCK - 4096))              # most of block 0
    vhd.write(leaf, BLOCK + 512, pattern(3, 1024))            # a little of block 1
    assert full_blocks(leaf) == []
    vhd.write(leaf, BLOCK - 4096, pattern(4, 4096))           # completes block 0
    assert full_blocks(leaf) == [0]
    vhd.write(leaf, BLOCK, pattern(5, 512))
    vhd.write(leaf, BLOCK + 1536, pattern(6, BLOCK - 1536))   # now block 1 is complete
    assert full_blocks(leaf) == [0, 1]
    vhd.write(leaf, 4 * BLOCK, pattern(7, 3 * BLOCK))         # whole new blocks 4, 5, 6
    assert full_blocks(leaf) == [0, 1, 4, 5, 6]
    assert vhd.check(leaf) == [] and vhd.check(base) == []


def test_coalesce_marks_the_blocks_it_fills(tmp_path: Path) -> None:
    base, mid, leaf = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 8 * MIB)
    vhd.snapshot(base, mid)
    vhd.write(mid, 0, pattern(1, 1024))                       # partial in the parent
    vhd.snapshot(mid, leaf)
    vhd.write(leaf, 1024, pattern(2, BLOCK - 1024))           # the rest of block 0
    vhd.write(leaf, 2 * BLOCK, pattern(3, BLOCK))             # a whole new block 2
    vhd.write(leaf, 3 * BLOCK, pattern(4, 512))               # partial block 3
    assert full_blocks(mid) == []
    vhd.coalesce(leaf)
    assert full_blocks(mid) == [0, 2]
    assert vhd.check(mid) == []


def test_resize_growing_the_bat_moves_the_batmap_and_keeps_its_bits(tmp_path: Path) -> None:
    img = tmp_path / "a.vhd"
    vhd.create(img, 64 * MIB)                                 # 32 entries: one BAT sector
    data = {0: pattern(1, BLOCK), 5 * BLOCK: pattern(2, 4096), 31 * BLOCK: pattern(3, BLOCK)}
    for off, d in data.items():
        vhd.write(img, off, d)
    before = full_blocks(img)
    vhd.resize(img, 400 * MIB)                                # 200 entries: two sectors
    header, bh, bits = batmap_of(img)
    assert header.max_table_entries == 200
    assert bh.batmap_offset == header.table_offset + 1024 + 512
    assert fmt.batmap_blocks(bits) == before == [0, 5, 31]
    vhd.resize(img, 3000 * MIB)                               # 1500 entries: twelve sectors
    assert full_blocks(img) == before
    for off, d in data.items():
        assert vhd.read(img, off, len(d)) == d
    assert vhd.read(img, 3000 * MIB - MIB, MIB) == bytes(MIB)
    vhd.write(img, 1499 * BLOCK, pattern(4, BLOCK))
    assert full_blocks(img) == [*before, 1499]
    assert vhd.check(img) == []


def test_resize_within_the_same_bat_sector_and_shrink(tmp_path: Path) -> None:
    img = tmp_path / "a.vhd"
    vhd.create(img, 64 * MIB)
    vhd.write(img, BLOCK, pattern(1, 100))
    vhd.resize(img, 200 * MIB)                                # 32 -> 100 entries, one sector
    assert batmap_of(img)[0].max_table_entries == 100 and full_blocks(img) == [1]
    assert vhd.check(img) == []
    vhd.resize(img, 4 * MIB)
    assert vhd.info(img).virtual_size == 4 * MIB and full_blocks(img) == [1]
    assert vhd.check(img) == []


def _patch(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _reseal(path: Path, size: int = 16 * MIB) -> None:
    """Recompute the batmap checksum after a deliberate change of its map."""
    _, bh, bits = batmap_of(path)
    header = fmt.Header.from_bytes(path.read_bytes()[512:1536])
    at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    _patch(path, at + 24, struct.pack(">I", fmt.batmap_checksum(bits, size, bh.version)))


@pytest.mark.parametrize(("damage", "reported"), [
    ("cookie", "no valid batmap"),
    ("version", "unsupported version"),
    ("offset", "invalid map offset"),
    ("size", "size zero"),
    ("checksum", "checksum"),
    ("unallocated", "unallocated block 7 full"),
    ("partial", "block 2 full, but its sector bitmap"),
])
def test_check_reports_and_repair_rebuilds(tmp_path: Path, damage: str, reported: str) -> None:
    base, img = tmp_path / "base.vhd", tmp_path / "a.vhd"
    vhd.create(base, 16 * MIB)
    vhd.snapshot(base, img)
    vhd.write(img, 0, pattern(1, BLOCK))
    vhd.write(img, 2 * BLOCK, pattern(2, 4096))
    vhd.write(img, 7 * BLOCK - 512, pattern(3, 512))
    model = vhd.read(img, 0, 16 * MIB)
    header = fmt.Header.from_bytes(img.read_bytes()[512:1536])
    at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    map_at = at + 512
    if damage == "cookie":
        _patch(img, at, b"notbatmp")
    elif damage == "version":
        _patch(img, at + 20, struct.pack(">I", 0x00010003))
    elif damage == "offset":
        _patch(img, at + 8, struct.pack(">Q", map_at + 100))
    elif damage == "size":
        _patch(img, at + 16, struct.pack(">I", 0))
    elif damage == "checksum":
        _patch(img, at + 24, struct.pack(">I", 0x12345678))
    elif damage in ("unallocated", "partial"):
        block = 7 if damage == "unallocated" else 2
        bits = bytearray(batmap_of(img)[2])
        fmt.batmap_set(bits, block)
        _patch(img, map_at, bytes(bits))
        _reseal(img)
    problems = vhd.check(img)
    assert any(reported in p for p in problems), problems
    assert vhd.read(img, 0, 16 * MIB) == model                # reads never need the batmap
    if damage != "partial":             # a bitmap per set bit is check's job, not open's
        with pytest.raises(vhd.Corrupt, match="run repair"):
            vhd.write(img, 5 * BLOCK, b"refused")
    done = vhd.repair(img)
    assert any("batmap" in d for d in done), done
    assert vhd.check(img) == []
    assert vhd.read(img, 0, 16 * MIB) == model
    assert full_blocks(img) == [0]
    assert vhd.repair(img) == []                              # nothing left to do


def test_a_map_smaller_than_the_bat_is_reported_and_rebuilt(tmp_path: Path) -> None:
    img = tmp_path / "big.vhd"
    vhd.create(img, 9 * 1024 * MIB)                           # 4608 blocks: two map sectors
    vhd.write(img, 4600 * BLOCK, pattern(1, 4096))
    header, bh, _ = batmap_of(img)
    assert bh.batmap_size == 2 and full_blocks(img) == [4600]
    at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    _patch(img, at + 16, struct.pack(">I", 1))
    assert any("fewer blocks than the BAT" in p for p in vhd.check(img))
    vhd.repair(img)
    assert vhd.check(img) == [] and full_blocks(img) == [4600]
    assert vhd.read(img, 4600 * BLOCK, 4096) == pattern(1, 4096)


def test_images_without_a_batmap_need_none(tmp_path: Path) -> None:
    """creator tap 1.1: libvhd uses a batmap only if a valid one is there;
    other creators (qemu, win) never have one."""
    img = tmp_path / "a.vhd"
    vhd.create(img, 8 * MIB)
    with Image.open(img, writable=True) as im:
        im.set_footer(im.footer.sealed(creator_version=0x00010001))
        hdr_at = fmt.batmap_header_offset(1536, 4)
        im._pwrite(bytes(512), hdr_at, "no batmap")
        im.sync()
    assert vhd.check(img) == []
    vhd.write(img, 0, b"tap 1.1")                               # no batmap kept
    assert vhd.read(img, 0, 7) == b"tap 1.1" and vhd.check(img) == []
    with Image.open(img, writable=True) as im:
        im.set_footer(im.footer.sealed(creator_app=b"win ", creator_version=0x00060001))
    vhd.write(img, BLOCK, b"win")
    assert vhd.check(img) == []


def test_locators_are_read_by_libvhds_data_space_rule(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 8 * MIB)
    vhd.snapshot(base, leaf)
    header = fmt.Header.from_bytes(leaf.read_bytes()[512:1536])
    locs = header.locators
    assert [loc.space for loc in locs[:3]] == [512, 512, 512]
    locs[0] = fmt.Locator(locs[0].code, 700, locs[0].data_length, 0, locs[0].data_offset)
    locs[1] = fmt.Locator(locs[1].code, 512, 600, 0, locs[1].data_offset)   # bytes, too long
    _patch(leaf, 512, header.sealed(locators_raw=fmt.pack_locators(locs)).to_bytes())
    problems = vhd.check(leaf)
    assert any("invalid data space 700" in p for p in problems), problems
    assert any("600 bytes of data in a space of 512" in p for p in problems), problems


def test_set_parent_refuses_a_locator_space_past_the_end(tmp_path: Path) -> None:
    """A locator claiming more space than the file holds is reported, and
    set_parent refuses to move things around it (no file grown to match)."""
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 8 * MIB)
    vhd.snapshot(base, leaf)
    header = fmt.Header.from_bytes(leaf.read_bytes()[512:1536])
    locs = header.locators
    locs[0] = fmt.Locator(locs[0].code, 0x7FFFFE00, locs[0].data_length, 0, locs[0].data_offset)
    _patch(leaf, 512, header.sealed(locators_raw=fmt.pack_locators(locs)).to_bytes())
    size = leaf.stat().st_size
    assert any("outside the file" in p for p in vhd.check(leaf))
    with pytest.raises(vhd.Corrupt, match="runs past the end"):
        vhd.set_parent(leaf, base)
    assert leaf.stat().st_size == size
