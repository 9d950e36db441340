"""Where things lie in a dynamic or differencing image, by libvhd's rules.

Owns the metadata regions of an image (footer copy, dynamic header, BAT,
batmap header and map, parent locators with the space libvhd reads for
them), libvhd's end of the metadata (``end_of_headers``: no data block may
start before it), where a new data block goes (its data on a 4 KiB
boundary, as libvhd places it), and the search for free room between the
metadata and the first block.  Pure functions: no file I/O here.
"""

from __future__ import annotations

import bisect
import itertools
import operator

from smcommon.vhd import format as fmt

DATA_ALIGN = 4096

Region = tuple[str, int, int]          # (name, start, length)


def block_at(pos: int, bitmap_size: int) -> int:
    """The first offset at or after ``pos`` for a block (bitmap, then data)
    whose data starts on a 4 KiB boundary, as libvhd places new blocks."""
    return fmt.round_up(pos + bitmap_size, DATA_ALIGN) - bitmap_size


def block_stride(bitmap_size: int, block_size: int) -> int:
    """Distance between consecutive new blocks: each one's data stays aligned."""
    return fmt.round_up(bitmap_size + block_size, DATA_ALIGN)


def locator_extent(loc: fmt.Locator) -> int:
    """Bytes a locator occupies: its space by libvhd's rule, else (invalid
    space) its data rounded up to a sector."""
    space = loc.space
    if space is not None:
        return space
    return max(fmt.SECTOR, fmt.round_up(min(loc.data_length, fmt.MAX_LOCATOR_DATA), fmt.SECTOR))


def metadata_regions(
    data_offset: int,
    header: fmt.Header,
    batmap: fmt.BatmapHeader | None = None,
) -> list[Region]:
    """Every metadata region the headers reference (the batmap's only if given)."""
    out: list[Region] = [
        ("footer copy", 0, fmt.FOOTER_SIZE),
        ("dynamic header", data_offset, fmt.HEADER_SIZE),
        ("BAT", header.table_offset, fmt.bat_bytes(header.max_table_entries)),
    ]
    if batmap is not None:
        out.append(("batmap header",
                    fmt.batmap_header_offset(header.table_offset, header.max_table_entries),
                    fmt.BATMAP_HEADER_SIZE))
        out.append(("batmap", batmap.batmap_offset, batmap.batmap_size * fmt.SECTOR))
    for i, loc in enumerate(header.locators):
        if loc.used:
            out.append((f"parent locator {i} ({loc.code.decode('latin-1')})",
                        loc.data_offset, locator_extent(loc)))
    return out


def end_of_headers(regions: list[Region]) -> int:
    """libvhd's end of the metadata: the first byte no metadata region reaches."""
    return max(start + length for _, start, length in regions)


def overlaps(a_start: int, a_len: int, b_start: int, b_len: int) -> bool:
    return a_start < b_start + b_len and b_start < a_start + a_len


def find_gap(occupied: list[tuple[int, int]], length: int, lo: int, hi: int) -> int | None:
    """The lowest sector-aligned offset in [lo, hi - length] whose ``length``
    bytes meet no occupied (start, length) range; None if there is none."""
    pos = fmt.round_up(max(lo, 0), fmt.SECTOR)
    for start, size in sorted(occupied):
        if pos + length > hi:
            return None
        if start + size <= pos:
            continue
        if start >= pos + length:
            return pos
        pos = fmt.round_up(max(pos, start + size), fmt.SECTOR)
    return pos if pos + length <= hi else None


def first_block_problem(bat: fmt.Bat, span: int, end: int,
                        regions: list[tuple[int, int]]) -> str | None:
    """The first broken rule among the data blocks (past the end, overlapping each
    other or metadata), or None; C-speed passes, no loop per block when sound."""
    offsets = bat.offsets()
    if not offsets:
        return None
    if offsets[-1] * fmt.SECTOR + span > end:
        return (f"BAT entry {offsets[-1]} (offset {offsets[-1] * fmt.SECTOR}) points past "
                f"the end of the image ({end})")
    if len(offsets) > 1 and min(map(operator.sub, offsets[1:], offsets[:-1])) * fmt.SECTOR < span:
        a, b = next((a, b) for a, b in itertools.pairwise(offsets) if (b - a) * fmt.SECTOR < span)
        if a == b:
            return f"two BAT entries point at the same block (sector {a})"
        return f"data blocks at sectors {a} and {b} overlap"
    for rstart, rlen in regions:
        # only blocks starting in (rstart - span, rstart + rlen) can overlap the region
        i = bisect.bisect_right(offsets, (rstart - span) // fmt.SECTOR)
        if i < len(offsets) and offsets[i] * fmt.SECTOR < rstart + rlen and \
                offsets[i] * fmt.SECTOR + span > rstart:
            return f"data block at sector {offsets[i]} overlaps metadata at offset {rstart}"
    return None
