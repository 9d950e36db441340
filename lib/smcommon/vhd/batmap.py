"""blktap's batmap: which images need one, reading and validating it as libvhd
does, and the writes that keep it right.

The batmap is one bit a block: set means the block is fully allocated (its
sector bitmap all ones), so tapdisk skips reading that bitmap; a clear bit is
always safe.  libvhd refuses a dynamic or differencing image whose creator is
``tap`` 1.2 or later without a valid batmap.  Rules this module keeps:

- the header lies exactly at the end of the padded BAT (it moves when the
  BAT grows), the map right after it in images this library lays out;
- the checksum covers the map's first ``batmap_checksum_len(current_size)``
  bytes, so a bit is set only for a block below the disk's last whole block
  and inside that range, and bits of blocks beyond the disk stay clear (a
  resize then never changes the checksum);
- a bit is set only once the block's full bitmap and its BAT entry are
  durable, never left set for a block that is not fully allocated; a header
  and the map sectors it covers are written in one write when the map
  follows the header (a process killed between two writes would leave a
  checksum that no longer matches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from smcommon.record import replace
from smcommon.vhd import format as fmt
from smcommon.vhd import layout

Write = tuple[int, bytes]           # (file offset, bytes)


def expected(footer: fmt.Footer) -> bool | None:
    """Does libvhd want a batmap here?  True: required (creator ``tap`` 1.2 or
    later, dynamic or differencing); None: optional (``tap`` 1.1: present iff a
    valid header is there); False: none."""
    if footer.disk_type == fmt.DISK_FIXED or footer.creator_app[:3] != b"tap":
        return False
    if footer.creator_version <= 0x00000001:
        return False
    if footer.creator_version >= 0x00010002:
        return True
    return None


class Batmap:
    """A batmap: where its header lies, the header, and the map's bytes."""

    def __init__(self, hdr_off: int, header: fmt.BatmapHeader, bits: bytearray) -> None:
        self.hdr_off = hdr_off
        self.header = header
        self.bits = bits

    @classmethod
    def new(cls, table_offset: int, entries: int, bits: bytes = b"") -> Batmap:
        """An empty (or ``bits``) map right after a header at the end of the BAT."""
        hdr_off = fmt.batmap_header_offset(table_offset, entries)
        size = fmt.batmap_sectors(entries)
        raw = bytearray(size * fmt.SECTOR)
        raw[: min(len(bits), len(raw))] = bits[: len(raw)]
        return cls(hdr_off, fmt.BatmapHeader.new(hdr_off + fmt.SECTOR, size), raw)

    @property
    def map_offset(self) -> int:
        return self.header.batmap_offset

    @property
    def map_bytes(self) -> int:
        return self.header.batmap_size * fmt.SECTOR

    @property
    def adjacent(self) -> bool:
        return self.map_offset == self.hdr_off + fmt.BATMAP_HEADER_SIZE

    def regions(self) -> list[tuple[int, int]]:
        return [(self.hdr_off, fmt.BATMAP_HEADER_SIZE), (self.map_offset, self.map_bytes)]

    def test(self, block: int) -> bool:
        return fmt.batmap_test(self.bits, block)

    def blocks(self) -> list[int]:
        return fmt.batmap_blocks(self.bits)

    def moved_map(self, map_offset: int) -> Batmap:
        """The same header sector and bits, the map at ``map_offset``."""
        header = replace(self.header, batmap_offset=map_offset)
        return Batmap(self.hdr_off, header, bytearray(self.bits))

    def sealed(self, current_size: int) -> fmt.BatmapHeader:
        h = self.header
        return replace(h, checksum=fmt.batmap_checksum(self.bits, current_size, h.version))

    def whole(self, current_size: int) -> list[Write]:
        """The writes of the whole batmap: one when the map follows the header."""
        self.header = self.sealed(current_size)
        head = self.header.to_bytes()
        if self.adjacent:
            return [(self.hdr_off, head + bytes(self.bits))]
        return [(self.map_offset, bytes(self.bits)), (self.hdr_off, head)]

    def change(self, current_size: int, block_size: int, *, full: Iterable[int] = (),
               clear_from: int | None = None) -> list[Write]:
        """Set the bits of blocks ``full`` (those that may carry one), clear every
        bit from block ``clear_from`` on; the writes that persist it ([] if
        nothing changed).  One write (header and map sectors up to the last
        changed one) when the map follows the header."""
        before = bytes(self.bits)
        limit = settable(current_size, block_size, len(self.bits))
        for b in full:
            if 0 <= b < limit:
                fmt.batmap_set(self.bits, b)
        if clear_from is not None:
            first = max(0, clear_from)
            for b in [b for b in fmt.batmap_blocks(self.bits) if b >= first]:
                fmt.batmap_set(self.bits, b, False)
        if bytes(self.bits) == before:
            return []
        changed = [i for i in range(0, len(before), fmt.SECTOR)
                   if before[i : i + fmt.SECTOR] != self.bits[i : i + fmt.SECTOR]]
        lo, hi = changed[0], changed[-1] + fmt.SECTOR
        self.header = self.sealed(current_size)
        head = self.header.to_bytes()
        if self.adjacent:
            return [(self.hdr_off, head + bytes(self.bits[:hi]))]
        return [(self.map_offset + lo, bytes(self.bits[lo:hi])), (self.hdr_off, head)]


def settable(current_size: int, block_size: int, map_bytes: int) -> int:
    """Blocks that may carry a set bit: whole blocks of the disk whose bit lies
    inside the checksummed part of the map (libvhd reads no further)."""
    return min(current_size // block_size, fmt.batmap_checksum_len(current_size) * 8,
               map_bytes * 8)


def extent_problem(bh: fmt.BatmapHeader, hdr_off: int, end: int) -> str | None:
    """Why the map cannot even be read (size zero, bad offset, past the end), or None."""
    where = f"batmap (header at {hdr_off})"
    if bh.batmap_size == 0:
        return f"{where}: size zero"
    if bh.batmap_size > fmt.batmap_sectors(fmt.MAX_TABLE_ENTRIES):
        return f"{where}: {bh.batmap_size} sectors, more than any BAT needs"
    if bh.batmap_offset == 0 or bh.batmap_offset % fmt.SECTOR:
        return f"{where}: invalid map offset {bh.batmap_offset}"
    if bh.batmap_offset + bh.batmap_size * fmt.SECTOR > end:
        return (f"{where}: map ({bh.batmap_size} sectors at {bh.batmap_offset}) lies past "
                f"the end of the image ({end})")
    return None


def header_problems(bh: fmt.BatmapHeader, hdr_off: int, data_offset: int,
                    header: fmt.Header, current_size: int) -> list[str]:
    """What libvhd (and this library) refuses in a readable batmap header:
    version, size against the BAT and the disk, a map over other metadata."""
    out: list[str] = []
    where = f"batmap (header at {hdr_off})"
    if bh.version > fmt.BATMAP_VERSION:
        out.append(f"{where}: unsupported version {bh.version >> 16}.{bh.version & 0xFFFF}")
    if bh.batmap_size * fmt.SECTOR * 8 < header.max_table_entries:
        out.append(f"{where}: {bh.batmap_size} sector(s) map fewer blocks than the BAT's "
                   f"{header.max_table_entries} entries")
    if bh.batmap_size * fmt.SECTOR < fmt.batmap_checksum_len(current_size):
        out.append(f"{where}: {bh.batmap_size} sector(s) are fewer than the disk size "
                   f"{current_size} needs")
    for name, start, length in layout.metadata_regions(data_offset, header)[:3] + [
            ("batmap header", hdr_off, fmt.BATMAP_HEADER_SIZE)]:
        if layout.overlaps(bh.batmap_offset, bh.batmap_size * fmt.SECTOR, start, length):
            out.append(f"{where}: map at {bh.batmap_offset} overlaps the {name} (at {start})")
    return out


def read(pread: Callable[[int, int], bytes], footer: fmt.Footer, header: fmt.Header,
         end: int) -> tuple[Batmap | None, list[str]]:
    """The image's batmap and what is wrong with it, by libvhd's rules: (None,
    []) when the image has none and needs none; (None, problems) when it needs
    one that is missing or unusable; (batmap, problems) otherwise (a checksum
    that does not match its map is a problem)."""
    want = expected(footer)
    if want is False:
        return None, []
    hdr_off = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    if hdr_off + fmt.BATMAP_HEADER_SIZE > end:
        if want is None:
            return None, []
        return None, [(f"no batmap: its header would lie at {hdr_off}, past the end of "
                       f"the metadata and data ({end})")]
    try:
        bh = fmt.BatmapHeader.from_bytes(pread(fmt.BATMAP_HEADER_SIZE, hdr_off),
                                         f"batmap header at {hdr_off}")
    except fmt.Corrupt as exc:
        if want is None:
            return None, []
        return None, [f"no valid batmap ({exc})"]
    fatal = extent_problem(bh, hdr_off, end)
    if fatal is not None:
        return None, [fatal]
    problems = header_problems(bh, hdr_off, footer.data_offset, header, footer.current_size)
    bits = bytearray(pread(bh.batmap_size * fmt.SECTOR, bh.batmap_offset))
    bm = Batmap(hdr_off, bh, bits)
    want_sum = fmt.batmap_checksum(bits, footer.current_size, bh.version)
    if want_sum != bh.checksum:
        problems.append(f"batmap (header at {hdr_off}): checksum {bh.checksum:#010x} does not "
                        f"match its map (computed {want_sum:#010x})")
    return bm, problems
