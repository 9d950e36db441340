"""Moving metadata inside an image, crash-safely: re-linking to a new parent,
growing the BAT (the batmap header must stay at its end), preparing a size
change, and rebuilding the batmap.

Every step leaves an image that libvhd's rules accept and that reads the
same: new metadata goes only into space no header references, and one write
of a header (the dynamic header, 1024 bytes in the file's first page, or a
batmap header sector) switches to it; data blocks in the way are first
copied to the end of the file (``Image.relocate_block``).  The steps and
why each intermediate state is sound are in docs/design.md.
"""

from __future__ import annotations

from smcommon.vhd import batmap as bmap
from smcommon.vhd import format as fmt
from smcommon.vhd import layout
from smcommon.vhd.create import locator_bytes, locator_space_for, place_locators
from smcommon.vhd.errors import Corrupt, Unsupported
from smcommon.vhd.image import Image


def occupied(img: Image) -> list[tuple[int, int]]:
    """(start, length) of every referenced metadata region (and the place the
    batmap must have), and of every data block.  Corrupt if a region runs past
    the end of the image (moving things around it would be guesswork)."""
    header = img.header_or_fail()
    assert img.bat is not None
    bm = img.batmap.header if img.batmap is not None else None
    regions = layout.metadata_regions(img.footer.data_offset, header, bm)
    for name, start, length in regions:
        if start + length > img.end():
            raise Corrupt(f"{img.path}: the {name} ({length} bytes at {start}) runs past the "
                          f"end of the image ({img.end()}); run check")
    out = [(s, n) for _, s, n in regions]
    if bmap.expected(img.footer) is not False:
        out.append(canonical_region(header))
    span = header.bitmap_size + header.block_size
    out += [(img.bat[b] * fmt.SECTOR, span) for b in img.bat.allocated()]
    return out


def canonical_region(header: fmt.Header) -> tuple[int, int]:
    """Where a batmap header and the map right after it lie for this BAT."""
    at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    return at, fmt.BATMAP_HEADER_SIZE + fmt.batmap_sectors(header.max_table_entries) * fmt.SECTOR


def room(img: Image, length: int, lo: int, may_move: bool = True) -> int:
    """Free space for ``length`` bytes of metadata at or after ``lo``, before the
    first data block: a gap nothing references if there is one, else made
    right after the metadata (blocks in the way moved to the end, the tail
    footer moved past it), unless ``may_move`` is False (Unsupported)."""
    header = img.header_or_fail()
    assert img.bat is not None
    taken = occupied(img)
    starts = [img.bat[b] * fmt.SECTOR for b in img.bat.allocated()]
    first = min(starts) if starts else img.end()
    at = layout.find_gap(taken, length, lo, first)
    if at is not None:
        return at
    if not may_move:
        raise Unsupported(f"{img.path}: no free room for {length} bytes of metadata "
                          "without moving data blocks")
    bm = img.batmap.header if img.batmap is not None else None
    meta = layout.metadata_regions(img.footer.data_offset, header, bm)
    at = fmt.round_up(max(lo, layout.end_of_headers(meta), *(s + n for s, n in taken
                                                             if s < first)), fmt.SECTOR)
    img.move_blocks_out(at, at + length)
    if at + length > img.end():
        img._set_end(fmt.round_up(at + length, fmt.SECTOR))
        img.sync()
    return at


def move_locators(img: Image, indices: list[int], lo: int) -> None:
    """Copy locators ``indices`` to free space at or after ``lo``, then switch the
    header to the copies (one write)."""
    header = img.header_or_fail()
    locs = header.locators
    payloads = [(locs[i].code, img._pread(min(locs[i].data_length, fmt.MAX_LOCATOR_DATA),
                                          locs[i].data_offset, "a parent locator"))
                for i in indices]
    at = room(img, sum(locator_space_for(d) for _, d in payloads), lo)
    placed = place_locators(payloads, at)
    img._pwrite(locator_bytes(placed, payloads), at, "parent locators")
    img.sync()
    for i, loc in zip(indices, placed, strict=True):
        locs[i] = loc
    img.set_header(header.sealed(locators_raw=fmt.pack_locators(locs)))


def relink(img: Image, parent: fmt.Footer, name: str,
           payloads: list[tuple[bytes, bytes]], may_move: bool = True) -> None:
    """Point differencing ``img`` at the image whose footer is ``parent``: the
    locators' data into free space, fdatasync, then the header (UUID,
    timestamp, name, locators) in one write.  ``may_move``: see ``room``."""
    img._check_writable()
    header = img.header_or_fail()
    at = room(img, sum(locator_space_for(d) for _, d in payloads), 0, may_move)
    placed = place_locators(payloads, at)
    img._pwrite(locator_bytes(placed, payloads), at, "parent locators")
    img.sync()
    img.set_header(header.sealed(
        parent_uuid=parent.uuid,
        parent_timestamp=parent.timestamp,
        parent_name_raw=fmt.encode_parent_name(name),
        locators_raw=fmt.pack_locators(placed),
    ))


def grow_bat(img: Image, need: int) -> None:
    """Make the BAT ``need`` entries long; the batmap header moves to its new end.

    1. data blocks in the way of the new BAT and batmap go to the end;
    2. locators in the way are copied past it (one header write switches);
    3. the map, if in the way, is copied past it and the old batmap header
       (still at the old end of the BAT) is pointed at the copy (one write);
    4. the new batmap (same bits) is written at the new end of the BAT;
    5. one header write switches to ``need`` entries: only the entries that
       map the disk are read, so the old batmap's bytes in the new part of
       the BAT do not matter until
    6. they are overwritten with unallocated entries (before the footer grows).
    """
    header = img.header_or_fail()
    assert img.bat is not None
    old, T = header.max_table_entries, header.table_offset
    size = img.virtual_size
    if fmt.bat_bytes(need) == fmt.bat_bytes(old):
        # the padded BAT keeps its sectors, so the batmap stays (libvhd pads with zeros)
        img._pwrite(b"\xff" * (4 * (need - old)), T + 4 * old, "the BAT")
        img.sync()
        img.set_header(header.sealed(max_table_entries=need))
        return
    bm = img.batmap
    new_bat_end = T + fmt.bat_bytes(need)
    stop = new_bat_end + (fmt.BATMAP_HEADER_SIZE + fmt.batmap_sectors(need) * fmt.SECTOR
                          if bm is not None else 0)
    img.move_blocks_out(T, stop)
    movers = [i for i, loc in enumerate(header.locators)
              if loc.used and layout.overlaps(loc.data_offset, layout.locator_extent(loc),
                                              T, stop - T)]
    if movers:
        move_locators(img, movers, stop)
    new: bmap.Batmap | None = None
    if bm is not None:
        if layout.overlaps(bm.map_offset, bm.map_bytes, T, stop - T):
            at = room(img, bm.map_bytes, stop)
            moved = bm.moved_map(at)
            img._pwrite(bytes(moved.bits), at, "a copy of the batmap")
            img.sync()
            img._pwrite(moved.sealed(size).to_bytes(), moved.hdr_off, "the batmap header")
            img.sync()
            img.batmap = moved
        new = bmap.Batmap.new(T, need, bytes(bm.bits))
        img.write_batmap(new.whole(size))
    img.set_header(img.header_or_fail().sealed(max_table_entries=need))
    img.batmap = new
    live_end = T + 4 * len(img.bat)
    img._pwrite(b"\xff" * (new_bat_end - live_end), live_end, "the BAT")
    img.sync()


def prepare_size(img: Image, size: int) -> None:
    """Before the footer takes ``size``: the BAT entries that will map the disk
    are unallocated (not stale bytes), and no batmap bit is set past the
    blocks both sizes allow (so the checksum, whose extent follows the disk
    size, stays right)."""
    header = img.header_or_fail()
    assert img.bat is not None
    live = len(img.bat)
    new_live = min(header.max_table_entries, fmt.blocks_for(size, header.block_size))
    if new_live > live:
        at = header.table_offset + 4 * live
        ff = b"\xff" * (4 * (new_live - live))
        if img._pread(len(ff), at, "the BAT") != ff:
            img._pwrite(ff, at, "the BAT")
            img.sync()
    bm = img.batmap
    if bm is not None:
        limit = min(bmap.settable(s, header.block_size, len(bm.bits))
                    for s in (img.virtual_size, size))
        img.write_batmap(bm.change(img.virtual_size, header.block_size, clear_from=limit))


def live_bat(img: Image) -> fmt.Bat:
    """The BAT entries that map the disk at its current size, read again."""
    header = img.header_or_fail()
    live = min(header.max_table_entries, fmt.blocks_for(img.virtual_size, header.block_size))
    return fmt.Bat.from_bytes(img._pread(4 * live, header.table_offset, "the BAT"), live)


def full_blocks(img: Image) -> list[int]:
    """The allocated blocks whose sector bitmap is all ones."""
    assert img.bat is not None
    return [b for b in img.bat.allocated()
            if img.bitmap(b, img.bat[b] * fmt.SECTOR) == -1]


def rebuild_batmap(img: Image) -> list[str]:
    """Lay the batmap out again where libvhd requires it, from the sector bitmaps:
    blocks where it must lie moved to the end first; what was done."""
    header = img.header_or_fail()
    assert img.bat is not None
    done: list[str] = []
    start, length = canonical_region(header)
    movers = [i for i, loc in enumerate(header.locators)
              if loc.used and layout.overlaps(loc.data_offset, layout.locator_extent(loc),
                                              start, length)]
    if movers:
        move_locators(img, movers, start + length)
        done.append(f"moved parent locator(s) {movers} out of the batmap's place")
    regions = layout.metadata_regions(img.footer.data_offset, img.header_or_fail())
    eoh = max(start + length, layout.end_of_headers(regions))
    span = header.bitmap_size + header.block_size
    before = [b for b in img.bat.allocated()
              if img.bat[b] * fmt.SECTOR < eoh or
              layout.overlaps(img.bat[b] * fmt.SECTOR, span, start, length)]
    img.move_blocks_out(0, eoh)
    if before:
        done.append(f"moved data block(s) {before} from where the metadata must be "
                    "to the end of the file")
    new = bmap.Batmap.new(header.table_offset, header.max_table_entries)
    new.change(img.virtual_size, header.block_size, full=full_blocks(img))
    img.write_batmap(new.whole(img.virtual_size))
    img.batmap = new
    done.append(f"wrote the batmap at {start} from the sector bitmaps "
                f"({len(new.blocks())} full block(s))")
    return done
