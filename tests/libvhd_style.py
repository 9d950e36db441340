"""A small libvhd-style VHD writer, reader and checker for the tests.

Written from the documented rules of blktap's libvhd (tests/data/vhd-corpus/
README.md and the VHD specification), independently of ``smcommon.vhd``, so
tests can make images the way tapdisk makes them and judge images with a
second pair of eyes:

- ``create``/``snapshot`` lay images out as ``vhd-util`` does: footer copy,
  header, BAT at 1536, the batmap header right after the padded BAT, the
  map after it, then (differencing) the MACX, W2KU and W2RU locators with
  the relative path to the parent, ``data_space`` in bytes (libvhd) or in
  sectors;
- ``write`` is ``vhd_io_write``: a new block goes at the end of the data
  (after the metadata and every block), its data on a 4 KiB boundary, its
  bitmap then its data zeroed; the stale bytes before it stay; the written
  sectors' bits are set, and once a block's bitmap is all ones its batmap
  bit is set; the footer is written at the new end of the data (and its copy
  at 0) and the file cut there;
- ``read`` resolves the chain through the locators as libvhd does;
- ``problems`` lists what libvhd's ``vhd-util check`` would refuse.
"""

from __future__ import annotations

import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
BLOCK = 2 * 1024 * 1024
SPB = BLOCK // SECTOR                 # sectors per block
BM = SPB // 8                         # bitmap bytes (one sector)
UNUSED = 0xFFFFFFFF
DYNAMIC, DIFF = 3, 4
FOOTER = struct.Struct(">8sIIQI4sI4sQQIII16sBB426s")
HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
LOCATOR = struct.Struct(">4sIIIQ")
BATMAP = struct.Struct(">8sQIIIB65s")
EPOCH = 946684800


def pad(n: int, to: int = SECTOR) -> int:
    return -(-n // to) * to


def csum(buf: bytes, at: int) -> int:
    return (~(sum(buf) - sum(buf[at : at + 4]))) & 0xFFFFFFFF


def chs(size: int) -> int:
    secs = min(max(1, size // SECTOR), 65535 * 16 * 255)
    if secs >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = secs // spt
    else:
        spt = 17
        cth = secs // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = secs // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = secs // spt
    return ((cth // heads) << 16) | (heads << 8) | spt


def space_bytes(data_space: int) -> int | None:
    """libvhd's rule: below 512 sectors, a multiple of 512 bytes, else invalid."""
    if 0 < data_space < 512:
        return data_space * SECTOR
    if data_space and data_space % SECTOR == 0:
        return data_space
    return None


@dataclass
class Vhd:
    """One image, parsed; ``save_*`` write parts back as libvhd does."""

    path: Path
    footer: list[object]
    header: list[object]
    bat: list[int]
    batmap: list[object] | None
    bmap: bytearray = field(default_factory=bytearray)

    # footer fields
    @property
    def size(self) -> int:
        return int(self.footer[9])  # type: ignore[call-overload]

    @property
    def disk_type(self) -> int:
        return int(self.footer[11])  # type: ignore[call-overload]

    @property
    def uuid(self) -> bytes:
        return bytes(self.footer[13])  # type: ignore[call-overload]

    # header fields
    @property
    def table(self) -> int:
        return int(self.header[2])  # type: ignore[call-overload]

    @property
    def entries(self) -> int:
        return int(self.header[4])  # type: ignore[call-overload]

    @property
    def batmap_at(self) -> int:
        return self.table + pad(self.entries * 4)

    def locators(self) -> list[tuple[bytes, int, int, int]]:
        """(code, data_space, data_len, data_offset) of the used locators, header order."""
        raw = bytes(self.header[11])  # type: ignore[call-overload]
        out = []
        for i in range(8):
            code, space, length, _res, off = LOCATOR.unpack_from(raw, 24 * i)
            if code != b"\0\0\0\0":
                out.append((code, space, length, off))
        return out

    def parent_name(self) -> str:
        return bytes(self.header[10]).decode("utf-16-be").split("\0")[0]  # type: ignore[call-overload]

    def eoh(self) -> int:
        """libvhd's end_of_headers."""
        end = max(int(self.footer[3]) + 1024, self.table + pad(self.entries * 4))  # type: ignore[call-overload]
        if self.batmap is not None:
            end = max(end, self.batmap_at + SECTOR,
                      int(self.batmap[1]) + int(self.batmap[2]) * SECTOR)  # type: ignore[call-overload]
        for _code, space, _len, off in self.locators():
            end = max(end, off + (space_bytes(space) or 0))
        return end

    def live(self) -> int:
        return self.size // BLOCK

    def end_of_data(self) -> int:
        end = self.eoh()
        for b in range(self.live()):
            if self.bat[b] != UNUSED:
                end = max(end, (self.bat[b] + 1) * SECTOR + BLOCK)
        return end

    def csum_len(self) -> int:
        return max(1, -(-(self.size >> 24) // SECTOR)) * SECTOR

    def batmap_checksum(self) -> int:
        return (~sum(self.bmap[: self.csum_len()])) & 0xFFFFFFFF

    def save_batmap(self) -> None:
        assert self.batmap is not None
        self.batmap[4] = self.batmap_checksum()
        with open(self.path, "r+b") as f:
            f.seek(int(self.batmap[1]))  # type: ignore[call-overload]
            f.write(self.bmap[: self.csum_len()])
            f.seek(self.batmap_at)
            f.write(BATMAP.pack(*self.batmap).ljust(SECTOR, b"\0"))  # type: ignore[arg-type]

    def save_bat(self) -> None:
        raw = struct.pack(f">{self.entries}I", *self.bat)
        with open(self.path, "r+b") as f:
            f.seek(self.table)
            f.write(raw.ljust(pad(len(raw)), b"\0"))   # libvhd pads with zeros

    def save_header(self) -> None:
        self.header[6] = 0
        raw = HEADER.pack(*self.header)
        self.header[6] = csum(raw, 36)
        with open(self.path, "r+b") as f:
            f.seek(int(self.footer[3]))  # type: ignore[call-overload]
            f.write(HEADER.pack(*self.header))

    def save_footer(self) -> None:
        """At the end of the data (the file is cut there) and at offset 0."""
        self.footer[12] = 0
        self.footer[12] = csum(FOOTER.pack(*self.footer), 64)
        raw = FOOTER.pack(*self.footer)
        end = self.end_of_data()
        with open(self.path, "r+b") as f:
            f.seek(end)
            f.write(raw)
            f.truncate(end + SECTOR)
            f.seek(0)
            f.write(raw)


def load(path: str | Path) -> Vhd:
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(-SECTOR, os.SEEK_END)
        footer = list(FOOTER.unpack(f.read(SECTOR)))
        f.seek(int(footer[3]))  # type: ignore[call-overload]
        header = list(HEADER.unpack(f.read(1024)))
        table, entries = int(header[2]), int(header[4])  # type: ignore[call-overload]
        f.seek(table)
        bat = list(struct.unpack(f">{entries}I", f.read(4 * entries)))
        vhd = Vhd(path, footer, header, bat, None)
        if footer[5] == b"tap\0" and int(footer[6]) >= 0x00010002:  # type: ignore[call-overload]
            f.seek(vhd.batmap_at)
            vhd.batmap = list(BATMAP.unpack(f.read(BATMAP.size)))
            f.seek(int(vhd.batmap[1]))  # type: ignore[call-overload]
            vhd.bmap = bytearray(f.read(int(vhd.batmap[2]) * SECTOR))  # type: ignore[call-overload]
    return vhd


def _new(path: Path, size: int, entries: int, disk_type: int, ts: int) -> Vhd:
    footer: list[object] = [b"conectix", 2, 0x00010000, SECTOR, ts, b"tap\0", 0x00010003,
                            b"\0\0\0\0", size, size, chs(size), disk_type, 0,
                            uuidlib.uuid4().bytes, 0, 0, bytes(426)]
    header: list[object] = [b"cxsparse", 0xFFFFFFFFFFFFFFFF, 3 * SECTOR, 0x00010000, entries,
                            BLOCK, 0, bytes(16), 0, 0, bytes(512), bytes(192), bytes(256)]
    vhd = Vhd(path, footer, header, [UNUSED] * entries, None)
    map_secs = max(1, pad(-(-entries // 8)) // SECTOR)
    vhd.batmap = [b"tdbatmap", vhd.batmap_at + SECTOR, map_secs, 0x00010002, 0, 0, bytes(65)]
    vhd.bmap = bytearray(map_secs * SECTOR)
    path.write_bytes(b"")
    return vhd


def create(path: str | Path, size: int, *, prealloc: int | None = None) -> None:
    """``vhd-util create -s``: ``size`` (and ``prealloc``) in bytes, whole blocks."""
    size = pad(size, BLOCK)
    entries = pad(prealloc or size, BLOCK) // BLOCK
    vhd = _new(Path(path), size, entries, DYNAMIC, int(time.time()) - EPOCH)
    vhd.save_batmap()
    vhd.save_bat()
    vhd.save_header()
    vhd.save_footer()


def encode_w2(rel: str) -> bytes:
    return (".\\" + rel.removeprefix("./").replace("/", "\\")).encode("utf-16-le")


def snapshot(parent: str | Path, child: str | Path, *, sectors: bool = False,
             slack: int = 0) -> None:
    """``vhd-util snapshot``: locators after the map (MACX, W2KU, W2RU), each in
    the sectors its path needs; ``data_space`` in bytes as libvhd writes it, or
    in sectors with ``sectors``; ``slack`` more sectors of space for each."""
    parent, child = Path(parent), Path(child)
    p = load(parent)
    vhd = _new(child, p.size, max(p.entries, p.size // BLOCK), DIFF, int(time.time()) - EPOCH)
    vhd.header[7] = p.uuid
    vhd.header[8] = int(parent.stat().st_mtime) - EPOCH    # libvhd: the parent's mtime
    vhd.header[10] = parent.name.encode("utf-16-be").ljust(512, b"\0")
    rel = os.path.relpath(parent.resolve(), child.resolve().parent)
    rel = rel if rel.startswith("../") else "./" + rel
    assert vhd.batmap is not None
    at = int(vhd.batmap[1]) + int(vhd.batmap[2]) * SECTOR  # type: ignore[call-overload]
    locs = b""
    with open(child, "r+b") as f:
        for code, data in ((b"MacX", ("file://" + rel).encode()), (b"W2ku", encode_w2(rel)),
                           (b"W2ru", encode_w2(rel))):
            space = pad(len(data)) + slack * SECTOR
            f.seek(at)
            f.write(data.ljust(space, b"\0"))
            locs += LOCATOR.pack(code, space // SECTOR if sectors else space, len(data), 0, at)
            at += space
    vhd.header[11] = locs.ljust(192, b"\0")
    vhd.save_batmap()
    vhd.save_bat()
    vhd.save_header()
    vhd.save_footer()


def write(path: str | Path, offset: int, data: bytes) -> None:
    """``vhd_io_write`` of whole sectors at ``offset``."""
    assert offset % SECTOR == 0 and len(data) % SECTOR == 0 and data
    vhd = load(path)
    assert offset + len(data) <= vhd.size
    with open(vhd.path, "r+b") as f:
        pos = 0
        while pos < len(data):
            blk, within = divmod(offset + pos, BLOCK)
            n = min(len(data) - pos, BLOCK - within)
            if vhd.bat[blk] == UNUSED:
                start = vhd.end_of_data()
                bm_at = pad(start + SECTOR, 4096) - SECTOR       # data 4 KiB aligned
                f.seek(bm_at)
                f.write(bytes(SECTOR + BLOCK))                   # bitmap and data zeroed
                vhd.bat[blk] = bm_at // SECTOR
                f.flush()
                vhd.save_bat()
            base = vhd.bat[blk] * SECTOR
            f.seek(base + SECTOR + within)
            f.write(data[pos : pos + n])
            if vhd.batmap is None or not vhd.bmap[blk // 8] & (0x80 >> (blk % 8)):
                f.seek(base)
                bits = bytearray(f.read(BM))
                for s in range(within // SECTOR, (within + n) // SECTOR):
                    bits[s // 8] |= 0x80 >> (s % 8)
                f.seek(base)
                f.write(bits)
                if vhd.batmap is not None and bits == b"\xff" * BM and blk < vhd.csum_len() * 8:
                    vhd.bmap[blk // 8] |= 0x80 >> (blk % 8)
                    f.flush()
                    vhd.save_batmap()
            pos += n
    vhd.save_footer()


def parent_of(vhd: Vhd) -> Path | None:
    """The parent's path, found through the locators in header order as libvhd does."""
    if vhd.disk_type != DIFF:
        return None
    raw = vhd.path.read_bytes()
    for code, space, length, off in vhd.locators():
        text = raw[off : off + length]
        if code == b"MacX":
            name = text.decode().removeprefix("file://")
        elif code in (b"W2ku", b"W2ru"):
            name = text.decode("utf-16-le").replace("\\", "/")
        else:
            continue
        full = Path(name) if name.startswith("/") else vhd.path.resolve().parent / name
        if full.is_file():
            return full
    raise FileNotFoundError(f"{vhd.path}: no locator leads to the parent")


_REV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _bits(raw: bytes) -> int:
    """A sector bitmap (most significant bit first) as an int with sector i at bit i."""
    return int.from_bytes(raw.translate(_REV), "little")


def read(path: str | Path, offset: int, length: int) -> bytes:
    """Bytes of the virtual disk through the chain (sector-aligned): for each
    sector, the first image of the chain whose block holds it (bitmap bit set)."""
    assert offset % SECTOR == 0 and length % SECTOR == 0
    chain: list[tuple[Vhd, bytes]] = []
    vhd: Vhd | None = load(path)
    while vhd is not None:
        chain.append((vhd, vhd.path.read_bytes()))
        parent = parent_of(vhd)
        vhd = load(parent) if parent else None
    out = bytearray(length)
    first, stop = offset // SECTOR, (offset + length) // SECTOR
    for blk in range(first // SPB, -(-stop // SPB)):
        lo, hi = max(first, blk * SPB) - blk * SPB, min(stop, (blk + 1) * SPB) - blk * SPB
        want = ((1 << (hi - lo)) - 1) << lo
        for img, raw in chain:
            if not want:
                break
            if blk >= img.live() or img.bat[blk] == UNUSED:
                continue
            base = img.bat[blk] * SECTOR
            have = want & _bits(raw[base : base + BM])
            want &= ~have
            while have:
                s = (have & -have).bit_length() - 1
                run = ((have >> s) ^ ((have >> s) + 1)).bit_length() - 1
                src = base + SECTOR + s * SECTOR
                dst = (blk * SPB + s - first) * SECTOR
                out[dst : dst + run * SECTOR] = raw[src : src + run * SECTOR]
                have &= ~(((1 << run) - 1) << s)
    return bytes(out)


def problems(path: str | Path, *, footer_copy: bool = True) -> list[str]:
    """What ``vhd-util check`` (libvhd) refuses in this image.  With
    ``footer_copy`` False, a copy at offset 0 that differs from the tail footer
    is let pass, as libvhd's open does (it reads the tail footer)."""
    out: list[str] = []
    raw = Path(path).read_bytes()
    eof = len(raw) - SECTOR
    tail, head = raw[-SECTOR:], raw[:SECTOR]
    if tail[:8] != b"conectix" or csum(tail, 64) != struct.unpack_from(">I", tail, 64)[0]:
        return ["tail footer invalid"]
    if head != tail and footer_copy:
        out.append("primary and backup footers do not match")
    vhd = load(path)
    h = raw[int(vhd.footer[3]) : int(vhd.footer[3]) + 1024]  # type: ignore[call-overload]
    if h[:8] != b"cxsparse" or csum(h, 36) != vhd.header[6]:
        return [*out, "header invalid"]
    if vhd.table % SECTOR or vhd.table + 4 * vhd.entries > eof:
        return [*out, "invalid table offset"]
    if vhd.batmap is not None:
        cookie, off, secs, version, checksum = vhd.batmap[:5]
        if cookie != b"tdbatmap":
            return [*out, "batmap: invalid cookie"]
        if int(version) > 0x00010002:  # type: ignore[call-overload]
            out.append("batmap: unsupported version")
        if not secs or int(secs) * 4096 < vhd.entries:  # type: ignore[call-overload]
            out.append("batmap: size")
        if not off or int(off) % SECTOR or int(off) + int(secs) * SECTOR > eof:  # type: ignore[call-overload]
            return [*out, "batmap: offset or size"]
        if vhd.batmap_checksum() != checksum:
            out.append("batmap: invalid checksum")
        for b in range(vhd.live()):
            if vhd.bmap[b // 8] & (0x80 >> (b % 8)):
                if vhd.bat[b] == UNUSED:
                    out.append(f"batmap shows unallocated block {b} full")
                elif raw[vhd.bat[b] * SECTOR : vhd.bat[b] * SECTOR + BM] != b"\xff" * BM:
                    out.append(f"batmap shows block {b} full, its bitmap is not")
    eoh = vhd.eoh()
    starts = sorted(vhd.bat[b] * SECTOR for b in range(vhd.live()) if vhd.bat[b] != UNUSED)
    for i, s in enumerate(starts):
        if s < eoh:
            out.append(f"block at {s} clobbers headers (end {eoh})")
        if s + SECTOR + BLOCK > eof:
            out.append(f"block at {s} clobbers the footer")
        if i and s < starts[i - 1] + SECTOR + BLOCK:
            out.append(f"block at {s} clobbers the block at {starts[i - 1]}")
    if vhd.disk_type == DIFF:
        for code, space, length, off in vhd.locators():
            nbytes = space_bytes(space)
            if nbytes is None or not length or length > nbytes or off + nbytes > eof:
                out.append(f"locator {code!r}: space {space}, length {length} at {off}")
        try:
            parent = parent_of(vhd)
        except (FileNotFoundError, UnicodeDecodeError) as exc:
            return [*out, str(exc)]
        assert parent is not None
        if parent.name != vhd.parent_name():
            out.append(f"parent name {vhd.parent_name()!r}, locators name {parent.name!r}")
        if load(parent).uuid != bytes(vhd.header[7]):  # type: ignore[call-overload]
            out.append("invalid parent uuid")
    return out


def facts(path: str | Path) -> dict[str, object]:
    """Structural facts of an image, to compare ours with blktap's."""
    vhd = load(path)
    blocks = [vhd.bat[b] * SECTOR for b in range(vhd.live()) if vhd.bat[b] != UNUSED]
    return {
        "table_offset": vhd.table,
        "batmap_header_at_bat_end": vhd.batmap is not None and vhd.batmap[0] == b"tdbatmap",
        "batmap_version": vhd.batmap[3] if vhd.batmap else None,
        "map_after_header": vhd.batmap is not None and vhd.batmap[1] == vhd.batmap_at + SECTOR,
        "map_sectors": vhd.batmap[2] if vhd.batmap else None,
        "data_4k_aligned": all((b + SECTOR) % 4096 == 0 for b in blocks),
        "blocks_after_metadata": all(b >= vhd.eoh() for b in blocks),
        "locator_spaces_valid": all(space_bytes(s) is not None and n <= (space_bytes(s) or 0)
                                    for _c, s, n, _o in vhd.locators()),
        "footer_copy_equal": Path(path).read_bytes()[:SECTOR] == Path(path).read_bytes()[-SECTOR:],
    }
