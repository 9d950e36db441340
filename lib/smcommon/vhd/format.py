"""The on-disk structures of a VHD image, and nothing else: no file I/O here.

Owns the footer (512 bytes, at the end of every image and copied at offset 0 of
dynamic and differencing images), the dynamic header (1024 bytes), the parent
locators inside it, the BAT (block allocation table), the per-block sector
bitmaps and blktap's batmap (a header and a map of fully allocated blocks).  Each structure is a ``struct.Struct`` with its layout and a frozen
record (``smcommon.record``) whose ``from_bytes``/``to_bytes`` round-trip byte for byte;
``from_bytes`` checks cookie and checksum and raises ``Corrupt`` naming what it
read.  All integers are big-endian, as the VHD specification says.
"""

from __future__ import annotations

import array
import math
import struct
import sys
import time

from smcommon.record import field_names, record, replace
from smcommon.vhd.errors import Corrupt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
BLOCK_SIZE = 2 * 1024 * 1024
MAX_VIRTUAL_SIZE = 2040 * 1024**3

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FEATURES_RESERVED = 0x00000002
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UNALLOCATED = 0xFFFFFFFF

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

# Xen's blktap: qemu then takes footer current_size as the disk size.
CREATOR_APP = b"tap\0"
CREATOR_VERSION = 0x00010003
CREATOR_OS = b"Lnx "

# Bounds for values read from a file, checked before any allocation.
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 256 * 1024 * 1024
MAX_TABLE_ENTRIES = 1 << 24
MAX_LOCATOR_DATA = 64 * 1024

LOC_NONE = b"\0\0\0\0"
LOC_W2RU = b"W2ru"
LOC_W2KU = b"W2ku"
LOC_MACX = b"MacX"
LOCATOR_CODES = (LOC_NONE, LOC_W2RU, LOC_W2KU, LOC_MACX, b"Wi2r", b"Wi2k", b"Mac ")

# VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
VHD_EPOCH = 946684800


def vhd_now() -> int:
    return max(0, int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF


def checksum(data: bytes | bytearray) -> int:
    """One's complement of the byte sum (the checksum field must be zero in ``data``)."""
    return (~sum(data)) & 0xFFFFFFFF


def _unpack_sealed(
    data: bytes | bytearray | memoryview, st: struct.Struct, cookie: bytes, checksum_at: int,
    where: str,
) -> tuple[Any, ...]:
    """The fields of a cookie-and-checksum structure (footer, dynamic header),
    checked: long enough, the right cookie (the first field), a checksum that
    matches the bytes with its own field zeroed."""
    if len(data) < st.size:
        raise Corrupt(f"{where}: truncated ({len(data)} of {st.size} bytes)")
    raw = bytes(data[: st.size])
    fields = st.unpack(raw)
    if fields[0] != cookie:
        raise Corrupt(f"{where}: bad cookie {fields[0]!r} (expected {cookie!r})")
    stored = int.from_bytes(raw[checksum_at : checksum_at + 4], "big")
    want = checksum(raw[:checksum_at] + b"\0\0\0\0" + raw[checksum_at + 4 :])
    if stored != want:
        raise Corrupt(f"{where}: bad checksum {stored:#010x} (computed {want:#010x})")
    return fields


def geometry(size: int) -> tuple[int, int, int]:
    """CHS geometry of ``size`` bytes, as in the VHD specification (appendix)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


# --- footer -----------------------------------------------------------------

# cookie 8s | features I | format version I | data offset Q | timestamp I |
# creator app 4s | creator version I | creator OS 4s | original size Q |
# current size Q | cylinders H | heads B | sectors per track B | disk type I |
# checksum I | uuid 16s | saved state B | hidden B (blktap) | reserved 426s
FOOTER_STRUCT = struct.Struct(">8sIIQI4sI4sQQHBBII16sBB426s")
assert FOOTER_STRUCT.size == FOOTER_SIZE
FOOTER_CHECKSUM_AT = 64
FOOTER_HIDDEN_AT = 85


@record(frozen=True)
class Footer:
    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    uuid: bytes
    saved_state: int
    hidden: int
    reserved: bytes

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "footer") -> Footer:
        footer = cls(*_unpack_sealed(data, FOOTER_STRUCT, FOOTER_COOKIE, FOOTER_CHECKSUM_AT, where))
        if footer.version >> 16 != 1:
            raise Corrupt(f"{where}: format version {footer.version >> 16}."
                          f"{footer.version & 0xFFFF}, only 1.x is known")
        if footer.disk_type not in DISK_TYPE_NAMES:
            raise Corrupt(f"{where}: unknown disk type {footer.disk_type}")
        return footer

    def to_bytes(self) -> bytes:
        return FOOTER_STRUCT.pack(*(getattr(self, f) for f in _FOOTER_FIELDS))

    def sealed(self, **changes: object) -> Footer:
        """A copy with ``changes`` applied and the checksum recomputed."""
        new = replace(self, **changes, checksum=0)  # type: ignore[arg-type]
        return replace(new, checksum=checksum(new.to_bytes()))

    @property
    def type_name(self) -> str:
        return DISK_TYPE_NAMES.get(self.disk_type, str(self.disk_type))

    @classmethod
    def new(cls, size: int, disk_type: int, uuid: bytes, data_offset: int) -> Footer:
        cyl, heads, spt = geometry(size)
        footer = cls(
            FOOTER_COOKIE, FEATURES_RESERVED, FORMAT_VERSION, data_offset, vhd_now(),
            CREATOR_APP, CREATOR_VERSION, CREATOR_OS, size, size, cyl, heads, spt,
            disk_type, 0, uuid, 0, 0, bytes(426),
        )
        return footer.sealed()


_FOOTER_FIELDS = field_names(Footer)


# --- parent locator -----------------------------------------------------------

# platform code 4s | data space I (sectors) | data length I (bytes) | reserved I |
# data offset Q (bytes from the start of the file)
LOCATOR_STRUCT = struct.Struct(">4sIIIQ")
assert LOCATOR_STRUCT.size == 24


@record(frozen=True)
class Locator:
    code: bytes = LOC_NONE
    data_space: int = 0
    data_length: int = 0
    reserved: int = 0
    data_offset: int = 0

    @property
    def space(self) -> int | None:
        """Bytes reserved for the data, as libvhd reads ``data_space``: None if invalid."""
        return locator_space(self.data_space)

    @classmethod
    def from_bytes(cls, data: bytes) -> Locator:
        return cls(*LOCATOR_STRUCT.unpack(bytes(data[: LOCATOR_STRUCT.size])))

    def to_bytes(self) -> bytes:
        return LOCATOR_STRUCT.pack(
            self.code, self.data_space, self.data_length, self.reserved, self.data_offset
        )

    @property
    def used(self) -> bool:
        return self.code != LOC_NONE


def locator_space(data_space: int) -> int | None:
    """libvhd's rule for ``data_space``: below 512 it counts sectors (the
    specification), a multiple of 512 counts bytes (what libvhd writes); any
    other value, or 0, is invalid (None)."""
    if 0 < data_space < SECTOR:
        return data_space * SECTOR
    if data_space and data_space % SECTOR == 0:
        return data_space
    return None


def encode_locator(code: bytes, path: str) -> bytes:
    """A locator's data as blktap writes it: W2RU/W2KU UTF-16LE, MACX a UTF-8 file URL."""
    if code == LOC_MACX:
        return ("file://" + path).encode("utf-8")
    return path.encode("utf-16-le")


def decode_locator(code: bytes, data: bytes) -> str:
    """The path a locator names; Corrupt if it cannot be decoded."""
    try:
        if code in (LOC_MACX, b"Mac "):
            text = data.decode("utf-8")
            text = text.removeprefix("file://")
        else:
            text = data.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise Corrupt(f"parent locator {code!r}: undecodable data ({exc.reason})") from None
    text = text.rstrip("\0")
    if "\0" in text:
        raise Corrupt(f"parent locator {code!r}: NUL inside the path")
    return text


# --- dynamic header -------------------------------------------------------

# cookie 8s | data offset Q | table offset Q | header version I |
# max table entries I | block size I | checksum I | parent uuid 16s |
# parent timestamp I | reserved I | parent unicode name 512s (UTF-16BE) |
# 8 parent locators 192s | reserved 256s
HEADER_STRUCT = struct.Struct(">8sQQIIII16sII512s192s256s")
assert HEADER_STRUCT.size == HEADER_SIZE
HEADER_CHECKSUM_AT = 36


@record(frozen=True)
class Header:
    cookie: bytes
    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_uuid: bytes
    parent_timestamp: int
    reserved1: int
    parent_name_raw: bytes
    locators_raw: bytes
    reserved2: bytes

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "dynamic header") -> Header:
        header = cls(*_unpack_sealed(data, HEADER_STRUCT, HEADER_COOKIE, HEADER_CHECKSUM_AT, where))
        if header.version != HEADER_VERSION:
            raise Corrupt(f"{where}: header version {header.version >> 16}."
                          f"{header.version & 0xFFFF}, only 1.0 is known")
        return header

    def validate(self, where: str = "dynamic header") -> None:
        """Raise Corrupt if a size in the header is out of bounds."""
        if self.data_offset != NO_OFFSET:
            raise Corrupt(f"{where}: data offset {self.data_offset:#x} (must be 0xFFFFFFFFFFFFFFFF)")
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise Corrupt(f"{where}: block size {bs} is not a power of two in "
                          f"[{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
        if not 0 < self.max_table_entries <= MAX_TABLE_ENTRIES:
            raise Corrupt(f"{where}: max table entries {self.max_table_entries} out of "
                          f"bounds (1..{MAX_TABLE_ENTRIES})")
        if self.table_offset % SECTOR:
            raise Corrupt(f"{where}: BAT offset {self.table_offset} is not sector aligned")

    def to_bytes(self) -> bytes:
        return HEADER_STRUCT.pack(*(getattr(self, f) for f in _HEADER_FIELDS))

    def sealed(self, **changes: object) -> Header:
        new = replace(self, **changes, checksum=0)  # type: ignore[arg-type]
        return replace(new, checksum=checksum(new.to_bytes()))

    @property
    def locators(self) -> list[Locator]:
        raw = self.locators_raw
        return [Locator.from_bytes(raw[i * 24 : i * 24 + 24]) for i in range(8)]

    @property
    def parent_name(self) -> str:
        return self.parent_name_raw.decode("utf-16-be", "replace").split("\0", 1)[0]

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.block_size)

    @classmethod
    def new(
        cls,
        table_offset: int,
        max_table_entries: int,
        block_size: int = BLOCK_SIZE,
        parent_uuid: bytes = bytes(16),
        parent_timestamp: int = 0,
        parent_name: str = "",
        locators: list[Locator] | None = None,
    ) -> Header:
        header = cls(
            HEADER_COOKIE, NO_OFFSET, table_offset, HEADER_VERSION, max_table_entries,
            block_size, 0, parent_uuid, parent_timestamp, 0,
            encode_parent_name(parent_name), pack_locators(locators or []), bytes(256),
        )
        return header.sealed()


_HEADER_FIELDS = field_names(Header)


def encode_parent_name(name: str) -> bytes:
    """The header's parent unicode name: UTF-16BE, truncated to 512 bytes, NUL padded."""
    raw = name.encode("utf-16-be")[:512]
    return raw + bytes(512 - len(raw))


def pack_locators(locators: list[Locator]) -> bytes:
    if len(locators) > 8:
        raise ValueError("at most 8 parent locators")
    full = list(locators) + [Locator()] * (8 - len(locators))
    return b"".join(loc.to_bytes() for loc in full)


# --- BAT and bitmaps ------------------------------------------------------------


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit a sector, padded to a whole sector."""
    bits = block_size // SECTOR
    return max(SECTOR, -(-bits // 8 // SECTOR) * SECTOR) if bits >= 8 else SECTOR


def bat_bytes(entries: int) -> int:
    """Bytes the BAT of ``entries`` entries occupies on disk (whole sectors)."""
    return -(-entries * 4 // SECTOR) * SECTOR


_CHUNK = 1024
_FREE_CHUNK = array.array("I", [UNALLOCATED]) * _CHUNK


class Bat:
    """The block allocation table: sector offsets of data blocks, 0xFFFFFFFF = none."""

    def __init__(self, entries: array.array[int]) -> None:
        self.entries = entries

    @classmethod
    def empty(cls, count: int) -> Bat:
        return cls(array.array("I", [UNALLOCATED]) * count)

    @classmethod
    def from_bytes(cls, data: bytes, count: int) -> Bat:
        if len(data) < count * 4:
            raise Corrupt(f"BAT: truncated ({len(data)} bytes for {count} entries)")
        entries = array.array("I")
        assert entries.itemsize == 4
        entries.frombytes(bytes(data[: count * 4]))
        if sys.byteorder == "little":
            entries.byteswap()
        return cls(entries)

    def to_bytes(self) -> bytes:
        """The table padded to whole sectors with 0xFF (unallocated), as blktap does."""
        out = array.array("I", self.entries)
        if sys.byteorder == "little":
            out.byteswap()
        raw = out.tobytes()
        return raw + b"\xff" * (bat_bytes(len(self.entries)) - len(raw))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> int:
        return self.entries[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.entries[index] = value

    def _used_chunks(self) -> list[int]:
        """Start indices of the CHUNK-entry slices holding an allocated entry.

        BATs have up to a million entries: whole slices compare in C (memcmp),
        so an empty or mostly empty table costs microseconds, not a Python loop.
        """
        e = self.entries
        return [i for i in range(0, len(e), _CHUNK) if e[i : i + _CHUNK] != _FREE_CHUNK[: len(e) - i]]

    def allocated(self) -> list[int]:
        """Indices of the allocated blocks, in order."""
        out: list[int] = []
        for i in self._used_chunks():
            part = self.entries[i : i + _CHUNK]
            out.extend(i + j for j, v in enumerate(part) if v != UNALLOCATED)
        return out

    def allocated_count(self) -> int:
        e = self.entries
        return sum(min(_CHUNK, len(e) - i) - e[i : i + _CHUNK].count(UNALLOCATED)
                   for i in self._used_chunks())

    def offsets(self) -> list[int]:
        """The allocated sector offsets, sorted (a duplicate shows as two equal neighbours).

        Tables are usually in ascending order already: Timsort is then linear.
        """
        out: list[int] = []
        for i in self._used_chunks():
            out.extend(filter(UNALLOCATED.__ne__, self.entries[i : i + _CHUNK]))
        out.sort()
        return out

    @staticmethod
    def entry_bytes(value: int) -> bytes:
        return struct.pack(">I", value)


# Bitmaps on disk are most significant bit first (bit 7 of byte 0 = sector 0).
# In memory they are Python ints with sector i at bit i: reversing the bits of
# every byte (one bytes.translate) and reading little-endian does it in C.
_REVERSE = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def bitmap_to_int(raw: bytes) -> int:
    return int.from_bytes(raw.translate(_REVERSE), "little")


def int_to_bitmap(bits: int, size: int) -> bytes:
    return bits.to_bytes(size, "little").translate(_REVERSE)


def sector_mask(first: int, count: int) -> int:
    """An int with bits ``first`` .. ``first + count - 1`` set."""
    return ((1 << count) - 1) << first


def runs(bits: int) -> list[tuple[int, int]]:
    """(first, count) of each run of set bits, in order: one step per run, not per bit."""
    out: list[tuple[int, int]] = []
    base = 0
    while bits:
        low = (bits & -bits).bit_length() - 1
        bits >>= low
        base += low
        count = (bits ^ (bits + 1)).bit_length() - 1
        out.append((base, count))
        bits >>= count
        base += count
    return out


# --- batmap (blktap) --------------------------------------------------------------

# The batmap is blktap's map of fully allocated blocks (sector bitmap all ones):
# a 512-byte header exactly at the end of the padded BAT, and the map (one bit
# a block, most significant bit first) at ``batmap_offset``.  libvhd requires it
# in every dynamic or differencing image whose creator is "tap" 1.2 or later.
# cookie 8s | batmap offset Q (bytes) | batmap size I (sectors) | version I |
# checksum I | marker B | keyhash: flag B, nonce 32s, hash 32s | zeros to 512
BATMAP_COOKIE = b"tdbatmap"
BATMAP_VERSION = 0x00010002
BATMAP_VERSION_1_1 = 0x00010001       # its checksum sums the bytes as signed chars
BATMAP_STRUCT = struct.Struct(">8sQIIIBB32s32s")
BATMAP_HEADER_SIZE = SECTOR


@record(frozen=True)
class BatmapHeader:
    cookie: bytes
    batmap_offset: int
    batmap_size: int
    version: int
    checksum: int
    marker: int
    key_flag: int
    key_nonce: bytes
    key_hash: bytes
    rest: bytes          # the header sector after the fields (zeros), kept as read

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, where: str = "batmap header") -> BatmapHeader:
        """Parse a header sector; Corrupt if short or the cookie is not ``tdbatmap``."""
        if len(data) < BATMAP_HEADER_SIZE:
            raise Corrupt(f"{where}: truncated ({len(data)} of {BATMAP_HEADER_SIZE} bytes)")
        raw = bytes(data[:BATMAP_HEADER_SIZE])
        cookie, offset, size, version, csum, marker, flag, nonce, khash = \
            BATMAP_STRUCT.unpack_from(raw)
        header = cls(cookie, offset, size, version, csum, marker, flag, nonce, khash,
                     raw[BATMAP_STRUCT.size :])
        if header.cookie != BATMAP_COOKIE:
            raise Corrupt(f"{where}: bad cookie {header.cookie[:8]!r} (expected {BATMAP_COOKIE!r})")
        return header

    def to_bytes(self) -> bytes:
        head = BATMAP_STRUCT.pack(
            self.cookie, self.batmap_offset, self.batmap_size, self.version, self.checksum,
            self.marker, self.key_flag, self.key_nonce, self.key_hash,
        )
        return head + self.rest

    @classmethod
    def new(cls, batmap_offset: int, batmap_size: int) -> BatmapHeader:
        return cls(BATMAP_COOKIE, batmap_offset, batmap_size, BATMAP_VERSION, 0, 0, 0,
                   bytes(32), bytes(32), bytes(BATMAP_HEADER_SIZE - BATMAP_STRUCT.size))


def batmap_header_offset(table_offset: int, entries: int) -> int:
    """Where libvhd looks for the batmap header: right after the padded BAT."""
    return table_offset + bat_bytes(entries)


def batmap_sectors(entries: int) -> int:
    """Sectors of a map for ``entries`` blocks (libvhd: at least one)."""
    return max(1, round_up(round_up(entries, 8) // 8, SECTOR) // SECTOR)


def batmap_checksum_len(current_size: int) -> int:
    """Bytes of the map the checksum covers: libvhd derives them from the disk
    size, ``(current_size >> 24)`` bytes rounded up to whole sectors, at least one."""
    return max(1, -(-(current_size >> 24) // SECTOR)) * SECTOR


def batmap_checksum(bitmap: bytes | bytearray, current_size: int, version: int) -> int:
    """One's complement of the sum of the map's first checksum_len bytes
    (unsigned; signed chars for batmap version 1.1, as libvhd sums them)."""
    data = bytes(bitmap[: batmap_checksum_len(current_size)])
    total = sum(data)
    if version == BATMAP_VERSION_1_1:
        total -= 256 * (len(data) - len(data.translate(None, bytes(range(128, 256)))))
    return (~total) & 0xFFFFFFFF


def batmap_test(bitmap: bytes | bytearray, block: int) -> bool:
    """Block ``block``'s bit: bit ``0x80 >> (block % 8)`` of byte ``block // 8``."""
    i = block >> 3
    return i < len(bitmap) and bool(bitmap[i] & (0x80 >> (block & 7)))


def batmap_set(bitmap: bytearray, block: int, value: bool = True) -> None:
    if value:
        bitmap[block >> 3] |= 0x80 >> (block & 7)
    else:
        bitmap[block >> 3] &= ~(0x80 >> (block & 7)) & 0xFF


def batmap_blocks(bitmap: bytes | bytearray) -> list[int]:
    """The blocks whose bit is set, in order."""
    bits = bitmap_to_int(bytes(bitmap))
    return [f + i for f, c in runs(bits) for i in range(c)]


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def blocks_for(size: int, block_size: int) -> int:
    return math.ceil(size / block_size) if size else 0
