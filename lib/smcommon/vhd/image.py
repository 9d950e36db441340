"""Open, create, read and write VHD images over a chain of parents.

Owns the ``Image`` object (one open file descriptor, the parsed footer, header
and BAT, and the opened parent chain), the parent search (locators resolved
relative to the child's directory first, never outside the allowed roots),
the crash-safe block allocation, and ``Info``.

Where an image ends (the tail footer's offset) is decided in one place,
``Image.end()``: a later logical-volume store, whose device is larger than the
image, changes only that method and ``_set_end()``.

Layout of the images this library creates (dynamic and differencing), the
layout libvhd (blktap's library, tapdisk's) makes, except where noted::

    0          footer copy (512)
    512        dynamic header (1024)
    1536       differencing only: LOCATOR_AREA (24 KiB) holding the W2RU, W2KU
               and MACX parent locators, each in the sectors its path needs
               (data_space in sectors), the rest free for the next re-link.
               libvhd puts locators after the batmap instead; they sit *before*
               the BAT here so that a BAT growth never has to move them and
               qemu's writer (it puts its first block right after the BAT)
               cannot reach them.
    BAT        max_table_entries * 4, padded to a sector with 0xFF
    BAT end    batmap header (512): where libvhd requires it; it moves when
               the BAT grows
    +512       the batmap's map (one bit a block, whole sectors)
    ...        data blocks: sector bitmap (512) + block (2 MiB), appended, the
               data on a 4 KiB boundary (as libvhd places it)
    end()      footer (512)

Only the first ``ceil(current_size / block_size)`` BAT entries are read
(libvhd reads no more): entries past the disk are ignored, which lets a BAT
grow crash-safely (docs/design.md).  Writable opens also read the batmap;
one that libvhd would refuse makes writes fail until ``repair``.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Self

from smcommon.vhd import batmap as bmap
from smcommon.vhd import format as fmt
from smcommon.vhd import layout, parents
from smcommon.vhd.errors import (
    ChainTooDeep,
    Corrupt,
    InvalidArgument,
    NotFound,
    ParentLoop,
    ParentMismatch,
    ReadOnly,
    VhdError,
    from_os_error,
)
from smcommon.vhd.info import Info, format_uuid
from smcommon.vhd.layout import first_block_problem
from smcommon.vhd.locks import lock_file
from smcommon.vhd.parents import LOCATOR_ORDER

MAX_CHAIN_DEPTH = 64
LOCATOR_AREA = 3 * 8192

class Image:
    """One open VHD file and, for a differencing disk, its opened parent chain."""

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.writable = writable
        self.footer: fmt.Footer
        self.header: fmt.Header | None = None
        self.bat: fmt.Bat | None = None
        self.parent: Image | None = None
        self.depth = 1
        self.tail_damaged = False
        self._size = 0
        self.batmap: bmap.Batmap | None = None
        self.batmap_problem: str | None = None
        self.repairing = False            # repair writes through a damaged batmap
        self._filled: set[int] = set()    # blocks made full, their batmap bits not set yet

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        search_dirs: list[str] | None = None,
        parents: bool = True,
        _seen: set[tuple[int, int]] | None = None,
        _depth: int = 1,
    ) -> Image:
        path = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise from_os_error(path, exc, "opening the image") from None
        img = cls(path, fd, writable)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{path}: not a regular file")
            seen = set() if _seen is None else _seen
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ParentLoop(f"{path}: parent loop (this image is its own ancestor)")
            seen.add(key)
            lock_file(fd, path, exclusive=writable)
            img._size = os.fstat(fd).st_size       # after the lock: a writer may have grown it
            img.depth = _depth
            img._load()
            if writable:
                img._heal_head()
            if parents and img.footer.disk_type == fmt.DISK_DIFFERENCING:
                if _depth >= MAX_CHAIN_DEPTH:
                    raise ChainTooDeep(f"{path}: chain deeper than {MAX_CHAIN_DEPTH} images")
                ppath = img.find_parent(search_dirs)
                img.parent = cls.open(
                    ppath, search_dirs=search_dirs, _seen=seen, _depth=_depth + 1
                )
                if not img.parent.is_fixed and img.parent.block_size != img.block_size:
                    raise Corrupt(f"{path}: block size {img.block_size} differs from its "
                                  f"parent's {img.parent.block_size} ({ppath})")
                if img.parent.footer.uuid != img.header_or_fail().parent_uuid:
                    raise ParentMismatch(
                        f"{path}: parent {ppath} has UUID "
                        f"{format_uuid(img.parent.footer.uuid)}, expected "
                        f"{format_uuid(img.header_or_fail().parent_uuid)}"
                    )
        except BaseException:
            img.close()
            raise
        return img

    def _pread(self, length: int, offset: int, what: str) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise from_os_error(self.path, exc, f"reading {what}") from None
        return data

    def _load(self) -> None:
        path = self.path
        if self._size < fmt.FOOTER_SIZE:
            raise Corrupt(f"{path}: file of {self._size} bytes is too small for a VHD footer")
        raw = self._pread(fmt.FOOTER_SIZE, self.end(), "the footer")
        try:
            self.footer = fmt.Footer.from_bytes(raw, f"{path}: footer")
        except Corrupt as tail_exc:
            # blktap keeps a copy at offset 0: read through it, refuse writes
            try:
                head = fmt.Footer.from_bytes(self._pread(512, 0, "footer copy"), "copy")
            except Corrupt:
                raise tail_exc from None
            if head.disk_type == fmt.DISK_FIXED:
                raise tail_exc from None
            self.footer = head
            self.tail_damaged = True
        footer = self.footer
        if footer.current_size % fmt.SECTOR:
            raise Corrupt(f"{path}: disk size {footer.current_size} is not a multiple of 512")
        if footer.disk_type == fmt.DISK_FIXED:
            if footer.current_size > self.end():
                raise Corrupt(f"{path}: fixed disk of {footer.current_size} bytes in a "
                              f"file of {self._size} bytes (truncated)")
            return
        hoff = footer.data_offset
        if hoff < fmt.FOOTER_SIZE or hoff + fmt.HEADER_SIZE > self.end():
            raise Corrupt(f"{path}: dynamic header offset {hoff} outside the file")
        header = fmt.Header.from_bytes(
            self._pread(fmt.HEADER_SIZE, hoff, "the dynamic header"), f"{path}: dynamic header"
        )
        header.validate(f"{path}: dynamic header")
        bat_len = fmt.bat_bytes(header.max_table_entries)
        if header.table_offset < hoff + fmt.HEADER_SIZE and header.table_offset + bat_len > hoff:
            raise Corrupt(f"{path}: BAT at {header.table_offset} overlaps the dynamic header")
        if header.table_offset < fmt.FOOTER_SIZE or header.table_offset + 4 * header.max_table_entries > self.end():
            raise Corrupt(f"{path}: BAT ({header.max_table_entries} entries at "
                          f"{header.table_offset}) lies outside the file")
        if header.max_table_entries * header.block_size < footer.current_size:
            raise Corrupt(f"{path}: BAT of {header.max_table_entries} blocks cannot map "
                          f"the disk size {footer.current_size}")
        self.header = header
        live = min(header.max_table_entries, fmt.blocks_for(footer.current_size, header.block_size))
        self.bat = fmt.Bat.from_bytes(
            self._pread(4 * live, header.table_offset, "the BAT"), live
        )
        self._check_blocks()
        if self.writable:
            self._load_batmap()

    def _load_batmap(self) -> None:
        """Read the batmap (writers keep it); a problem libvhd would refuse is kept
        in ``batmap_problem`` (writes then fail, reads do not need the batmap)."""
        assert self.header is not None and self.bat is not None
        found, problems = bmap.read(lambda n, at: self._pread(n, at, "the batmap"),
                                    self.footer, self.header, self.end())
        if found is not None:
            span = self.header.bitmap_size + self.header.block_size
            clash = first_block_problem(self.bat, span, self.end(), found.regions())
            if clash:
                problems.append(f"batmap: {clash}")
            bat = self.bat
            wrong = [b for b in found.blocks() if b < len(bat) and bat[b] == fmt.UNALLOCATED]
            if wrong:
                problems.append(f"batmap marks unallocated block(s) {wrong[:8]} full")
        self.batmap = found if not problems else None
        self.batmap_problem = "; ".join(problems) or None

    def _check_blocks(self) -> None:
        """Every BAT entry inside the file, after the metadata, no two overlapping."""
        assert self.header is not None and self.bat is not None
        span = self.header.bitmap_size + self.header.block_size
        regions = [(0, fmt.FOOTER_SIZE), (self.footer.data_offset, fmt.HEADER_SIZE),
                   (self.header.table_offset, fmt.bat_bytes(self.header.max_table_entries))]
        regions += [(loc.data_offset, min(loc.data_length, fmt.MAX_LOCATOR_DATA) or 1)
                    for loc in self.header.locators if loc.used]
        problem = first_block_problem(self.bat, span, self.end(), regions)
        if problem:
            raise Corrupt(f"{self.path}: {problem}")

    def _heal_head(self) -> None:
        """Bring a stale footer copy (an update killed after the tail write) up to date."""
        if self.is_fixed or self.tail_damaged:
            return
        head = self._pread(fmt.FOOTER_SIZE, 0, "the footer copy")
        raw = self.footer.to_bytes()
        if head != raw:
            try:
                old = fmt.Footer.from_bytes(head)
            except Corrupt:
                return                   # damaged, not stale: that is repair's job
            if old.uuid == self.footer.uuid:
                self._pwrite(raw, 0, "the footer copy")
                self.sync()

    def header_or_fail(self) -> fmt.Header:
        if self.header is None:
            raise InvalidArgument(f"{self.path}: a fixed disk has no dynamic header")
        return self.header

    def find_parent(self, search_dirs: list[str] | None = None) -> str:
        """The parent's path from the locators: W2RU first, never outside the allowed roots."""
        return parents.find_parent(self, search_dirs)

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
            self.parent = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- where the image ends ----------------------------------------------------

    def end(self) -> int:
        """Offset of the tail footer of this image."""
        return tail_offset(self._size)

    def _set_end(self, new_end: int) -> None:
        """Write the footer at ``new_end`` (growing the file): the old end becomes free."""
        self._pwrite(self.footer.to_bytes(), new_end, "the footer")
        self._size = max(self._size, new_end + fmt.FOOTER_SIZE)

    # --- properties --------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.footer.current_size

    @property
    def is_fixed(self) -> bool:
        return self.footer.disk_type == fmt.DISK_FIXED

    @property
    def block_size(self) -> int:
        return self.header.block_size if self.header else fmt.BLOCK_SIZE

    @property
    def bitmap_size(self) -> int:
        return self.header.bitmap_size if self.header else 0

    def chain(self) -> list[Image]:
        out: list[Image] = []
        img: Image | None = self
        while img is not None:
            out.append(img)
            img = img.parent
        return out

    def info(self) -> Info:
        hdr = self.header
        diff = self.footer.disk_type == fmt.DISK_DIFFERENCING
        allocated = self.bat.allocated_count() if self.bat else 0
        max_blocks = hdr.max_table_entries if hdr else fmt.blocks_for(self.virtual_size, fmt.BLOCK_SIZE)
        return Info(
            path=self.path,
            uuid=format_uuid(self.footer.uuid),
            disk_type=self.footer.type_name,
            virtual_size=self.virtual_size,
            physical_size=self.end() + fmt.FOOTER_SIZE,
            block_size=self.block_size,
            max_blocks=max_blocks,
            allocated_blocks=allocated if hdr else max_blocks,
            parent=self.parent.path if self.parent else None,
            parent_uuid=format_uuid(hdr.parent_uuid) if (hdr and diff) else None,
            hidden=bool(self.footer.hidden),
            depth=len(self.chain()),
            creator=self.footer.creator_app.decode("latin-1").replace("\0", " "),
        )

    # --- block access ----------------------------------------------------------

    def block_pos(self, block: int) -> int | None:
        """File offset of block ``block``'s bitmap, or None if not allocated."""
        if self.bat is None or block >= len(self.bat):
            return None
        sector = self.bat[block]
        return None if sector == fmt.UNALLOCATED else sector * fmt.SECTOR

    def bitmap(self, block: int, pos: int) -> int:
        """The sector bitmap of an allocated block, as an int (bit i = sector i)."""
        raw = self._pread(self.bitmap_size, pos, "a sector bitmap")
        if raw == _full_bitmap(self.bitmap_size):
            return -1
        return fmt.bitmap_to_int(raw)

    def _read_run(self, view: memoryview, pos: int) -> None:
        try:
            got = os.preadv(self.fd, [view], pos)
        except OSError as exc:
            raise from_os_error(self.path, exc, "reading data") from None
        if got != len(view):
            raise Corrupt(f"{self.path}: short read at {pos} (file truncated?)")

    def read_block_into(self, block: int, first: int, view: memoryview) -> None:
        """Fill ``view`` with sectors ``first``.. of ``block``, resolving the chain."""
        nsec = len(view) // fmt.SECTOR
        wanted = fmt.sector_mask(first, nsec)
        img: Image | None = self
        while img is not None and wanted:
            base = block * self.block_size
            if img.is_fixed:
                limit = img.virtual_size
                for f, c in fmt.runs(wanted):
                    start = base + f * fmt.SECTOR
                    stop = min(start + c * fmt.SECTOR, limit)
                    if stop > start:
                        off = (f - first) * fmt.SECTOR
                        img._read_run(view[off : off + stop - start], start)
                return
            pos = img.block_pos(block)
            if pos is not None:
                bits = img.bitmap(block, pos)
                have = wanted & bits
                data = pos + img.bitmap_size
                for f, c in fmt.runs(have):
                    off = (f - first) * fmt.SECTOR
                    img._read_run(view[off : off + c * fmt.SECTOR], data + f * fmt.SECTOR)
                wanted &= ~have
            img = img.parent

    def read(self, offset: int, length: int) -> bytes:
        check_int("offset", offset)
        check_int("length", length)
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{self.path}: negative offset or length")
        if offset + length > self.virtual_size:
            raise InvalidArgument(f"{self.path}: read of {length} bytes at {offset} goes past "
                                  f"the disk size {self.virtual_size}")
        start = offset // fmt.SECTOR * fmt.SECTOR
        stop = fmt.round_up(offset + length, fmt.SECTOR)
        try:
            data = b"".join(self._pieces(start, stop))
        except MemoryError:
            raise InvalidArgument(f"{self.path}: cannot hold {length} bytes in memory; "
                                  "read in smaller pieces") from None
        if (start, stop) != (offset, offset + length):
            return data[offset - start : offset - start + length]
        return data

    def _pieces(self, start: int, stop: int) -> list[bytes | bytearray]:
        """The sector-aligned range as pieces, one per block: a block wholly in this
        image is one pread, a block in no image is zeros; others resolve the chain."""
        bs = self.block_size
        pieces: list[bytes | bytearray] = []
        pos = start
        while pos < stop:
            block, within = divmod(pos, bs)
            n = min(stop - pos, bs - within)
            bpos = None if self.is_fixed else self.block_pos(block)
            piece: bytes | bytearray
            if self.is_fixed:
                piece = self._pread(n, pos, "data")
            elif bpos is not None and self.bitmap(block, bpos) == -1:
                piece = self._pread(n, bpos + self.bitmap_size + within, "data")
            elif bpos is None and all(i.block_pos(block) is None and not i.is_fixed
                                      for i in self.chain()):
                piece = bytes(n)
            else:
                buf = bytearray(n)
                self.read_block_into(block, within // fmt.SECTOR, memoryview(buf))
                piece = buf
            if len(piece) != n:
                raise Corrupt(f"{self.path}: short read at {pos} (file truncated?)")
            pieces.append(piece)
            pos += n
        return pieces

    def read_into(self, view: memoryview, offset: int) -> None:
        """Sector-aligned read of ``len(view)`` bytes at ``offset`` (buffer pre-zeroed)."""
        bs = self.block_size
        pos = offset
        end = offset + len(view)
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(end - pos, bs - within)
            self.read_block_into(block, within // fmt.SECTOR, view[pos - offset : pos - offset + n])
            pos += n

    # --- writing -----------------------------------------------------------------

    def _pwrite(self, data: bytes | bytearray | memoryview, pos: int, what: str) -> None:
        try:
            done = os.pwrite(self.fd, data, pos)
            while done < len(data):
                done += os.pwrite(self.fd, memoryview(data)[done:], pos + done)
        except OSError as exc:
            raise from_os_error(self.path, exc, f"writing {what}") from None

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise from_os_error(self.path, exc, "fdatasync") from None

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.path}: image opened read-only")
        if self.tail_damaged:
            raise Corrupt(f"{self.path}: tail footer damaged; run repair before writing")
        if self.batmap_problem and not self.repairing:
            raise Corrupt(f"{self.path}: {self.batmap_problem}; run repair before writing")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` of the virtual disk; durable when it returns."""
        self._check_writable()
        check_int("offset", offset)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"data must be bytes, not {type(data).__name__}")
        if isinstance(data, memoryview):
            data = data.cast("B") if data.c_contiguous else data.tobytes()
        length = len(data)
        if offset < 0:
            raise InvalidArgument(f"{self.path}: negative offset")
        if offset + length > self.virtual_size:
            raise InvalidArgument(f"{self.path}: write of {length} bytes at {offset} goes "
                                  f"past the disk size {self.virtual_size}")
        if not length:
            return
        start = offset // fmt.SECTOR * fmt.SECTOR
        stop = fmt.round_up(offset + length, fmt.SECTOR)
        if (start, stop) != (offset, offset + length):
            # partial sectors: merge with what the chain holds there now
            buf = bytearray(stop - start)
            self.read_into(memoryview(buf)[: fmt.SECTOR], start)
            if stop - fmt.SECTOR > start:
                self.read_into(memoryview(buf)[-fmt.SECTOR :], stop - fmt.SECTOR)
            buf[offset - start : offset - start + length] = data
            data = buf
        self.write_aligned(start, memoryview(data))

    def write_aligned(self, offset: int, view: memoryview, sync: bool = True) -> None:
        if self.is_fixed:
            self._pwrite(view, offset, "data")
            if sync:
                self.sync()
            return
        bs = self.block_size
        pos = offset
        end = offset + len(view)
        dirty = False
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(end - pos, bs - within)
            chunk = view[pos - offset : pos - offset + n]
            if self.block_pos(block) is None:
                self.allocate_block(block, within // fmt.SECTOR, chunk)
            else:
                self._write_in_block(block, within // fmt.SECTOR, chunk)
                dirty = True
            pos += n
        if dirty and sync:
            self.sync()
            self._mark_filled()

    def _write_in_block(self, block: int, first: int, chunk: memoryview) -> None:
        """Data first, then the bitmap bits; the caller fsyncs (then marks the
        block full in the batmap if this write filled its bitmap)."""
        bpos = self.block_pos(block)
        assert bpos is not None
        self._check_writable()
        self._pwrite(chunk, bpos + self.bitmap_size + first * fmt.SECTOR, "data")
        bits = self.bitmap(block, bpos)
        add = fmt.sector_mask(first, len(chunk) // fmt.SECTOR)
        if bits != -1 and (bits | add) != bits:
            self._pwrite(fmt.int_to_bitmap(bits | add, self.bitmap_size), bpos, "a sector bitmap")
        if self._is_full(bits | add) and self.batmap is not None and not self.batmap.test(block):
            self._filled.add(block)       # full now (or already, its bit never set)

    def _is_full(self, bits: int) -> bool:
        n = self.block_size // fmt.SECTOR
        return bits == -1 or bits & fmt.sector_mask(0, n) == fmt.sector_mask(0, n)

    def _mark_filled(self) -> None:
        """Set the batmap bits of the blocks made full since the last call (their
        bitmaps and BAT entries are durable by now): one write, fdatasync."""
        filled, self._filled = self._filled, set()
        bm, bat = self.batmap, self.bat
        if bm is None or bat is None or not filled:
            return
        full = [b for b in filled if b < len(bat) and bat[b] != fmt.UNALLOCATED]
        writes = bm.change(self.virtual_size, self.block_size, full=full)
        for at, raw in writes:
            self._pwrite(raw, at, "the batmap")
        if writes:
            self.sync()

    def write_batmap(self, writes: list[tuple[int, bytes]]) -> None:
        """Persist batmap writes (from ``Batmap.change`` or ``whole``), fdatasync."""
        for at, raw in writes:
            self._pwrite(raw, at, "the batmap")
        if writes:
            self.sync()

    def allocate_block(self, block: int, first: int, chunk: memoryview) -> None:
        """Append a new block holding ``chunk`` at sector ``first``, crash-safely."""
        self.allocate_blocks([(block, first, chunk, None)])

    def allocate_blocks(
        self, items: list[tuple[int, int, bytes | bytearray | memoryview, int | None]]
    ) -> None:
        """Append new blocks: (block, first sector, data, sector bits or None), crash-safely.

        Order: the footer at the new end first (the file always has a valid tail
        footer), then bitmaps and data into the gap, fdatasync, then the BAT
        entries, fdatasync.  Killed at any instant, the BAT points only at
        durable data; an unfinished block is unreferenced space.  ``bits`` None
        means the sectors ``data`` covers; -1 means all.
        """
        base = self.reserve_blocks(len(items))
        stride = self.block_stride
        for i, (block, first, chunk, bits) in enumerate(items):
            self.put_block(base + i * stride, block, first, chunk, bits)
        self.commit_blocks([(block, base + i * stride) for i, (block, *_) in enumerate(items)])

    @property
    def block_stride(self) -> int:
        """Distance between consecutive new blocks (their data 4 KiB aligned)."""
        return layout.block_stride(self.bitmap_size, self.block_size)

    def reserve_blocks(self, count: int) -> int:
        """Step 1 of an allocation: the offset of the first of ``count`` new blocks
        (the others follow every ``block_stride`` bytes) after everything in the
        file, data on a 4 KiB boundary; the tail footer moves past them."""
        self._check_writable()
        header = self.header_or_fail()
        base = layout.block_at(fmt.round_up(self.end(), fmt.SECTOR), header.bitmap_size)
        self._set_end(base + (count - 1) * self.block_stride + header.bitmap_size
                      + header.block_size if count else base)
        return base

    def put_block(self, bpos: int, block: int, first: int,
                  chunk: bytes | bytearray | memoryview, bits: int | None) -> None:
        """Step 2: bitmap and data of a new block at ``bpos`` (inside the reserved gap)."""
        header = self.header_or_fail()
        assert self.bat is not None
        if block >= len(self.bat) or self.bat[block] != fmt.UNALLOCATED:
            raise InvalidArgument(f"{self.path}: block {block} beyond the BAT or allocated")
        if bits is None:
            bits = fmt.sector_mask(first, len(chunk) // fmt.SECTOR)
        if self.footer.disk_type == fmt.DISK_DIFFERENCING and not self._is_full(bits):
            bitmap = fmt.int_to_bitmap(bits, header.bitmap_size)
            self._filled.discard(block)
        else:
            # a dynamic disk's unwritten sectors are the hole's zeros: all present
            bitmap = _full_bitmap(header.bitmap_size)
            self._filled.add(block)
        if first == 0:
            self._pwritev(bitmap, chunk, bpos)
        else:
            self._pwrite(bitmap, bpos, "a sector bitmap")
            self._pwrite(chunk, bpos + header.bitmap_size + first * fmt.SECTOR, "data")

    def commit_blocks(self, placed: list[tuple[int, int]]) -> None:
        """Step 3: fdatasync the data, then point the BAT at it, fdatasync; then
        the batmap bits of the blocks now full (one write, fdatasync)."""
        self.sync()
        if placed:
            header = self.header_or_fail()
            assert self.bat is not None
            for block, bpos in placed:
                sector = bpos // fmt.SECTOR
                self._pwrite(fmt.Bat.entry_bytes(sector), header.table_offset + 4 * block,
                             "the BAT")
                self.bat[block] = sector
            self.sync()
        self._mark_filled()

    def relocate_block(self, block: int) -> None:
        """Move a block to the end of the file (data 4 KiB aligned), crash-safely:
        copy, fdatasync, point the BAT at the copy, fdatasync.  Its batmap bit
        names the block, not the place: it stays."""
        header = self.header_or_fail()
        old = self.block_pos(block)
        assert old is not None and self.bat is not None
        new = self.reserve_blocks(1)
        copy_range(self.fd, self.fd, old, new, header.bitmap_size + header.block_size, self.path)
        self.sync()
        self._pwrite(fmt.Bat.entry_bytes(new // fmt.SECTOR), header.table_offset + 4 * block,
                     "the BAT")
        self.sync()
        self.bat[block] = new // fmt.SECTOR

    def move_blocks_out(self, start: int, stop: int) -> None:
        """Relocate every data block that overlaps [start, stop) to the end."""
        header = self.header_or_fail()
        assert self.bat is not None
        span = header.bitmap_size + header.block_size
        movers = sorted((self.bat[b], b) for b in self.bat.allocated()
                        if layout.overlaps(self.bat[b] * fmt.SECTOR, span, start, stop - start))
        for _, block in movers:
            self.relocate_block(block)

    def relock(self, *, exclusive: bool) -> None:
        """Take the lock again and re-read the metadata (it may have changed meanwhile)."""
        lock_file(self.fd, self.path, exclusive=exclusive)
        self._size = os.fstat(self.fd).st_size
        self._load()

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _pwritev(self, head: bytes, data: bytes | bytearray | memoryview, pos: int) -> None:
        try:
            done = os.pwritev(self.fd, [head, data], pos)
        except OSError as exc:
            raise from_os_error(self.path, exc, "writing a new block") from None
        if done < len(head):
            self._pwrite(head[done:], pos + done, "a sector bitmap")
            done = len(head)
        if done < len(head) + len(data):
            self._pwrite(memoryview(data)[done - len(head) :], pos + done, "data")

    def set_footer(self, footer: fmt.Footer) -> None:
        """Rewrite the tail footer, then the copy at offset 0; fsync'd."""
        self._check_writable()
        self.footer = footer
        raw = footer.to_bytes()
        self._pwrite(raw, self.end(), "the footer")
        if not self.is_fixed:
            self._pwrite(raw, 0, "the footer copy")
        self.sync()

    def set_header(self, header: fmt.Header) -> None:
        self._check_writable()
        self._pwrite(header.to_bytes(), self.footer.data_offset, "the dynamic header")
        self.sync()
        self.header = header


def copy_range(src: int, dst: int, src_pos: int, dst_pos: int, length: int, path: str) -> None:
    """Copy bytes in the kernel (copy_file_range), falling back to pread/pwrite."""
    try:
        while length > 0:
            done = os.copy_file_range(src, dst, length, src_pos, dst_pos)
            if done <= 0:
                break
            src_pos += done
            dst_pos += done
            length -= done
    except OSError:
        pass
    try:
        while length > 0:
            chunk = os.pread(src, min(length, 8 * fmt.BLOCK_SIZE), src_pos)
            if not chunk:
                raise Corrupt(f"{path}: short read at {src_pos} while copying")
            os.pwrite(dst, chunk, dst_pos)
            src_pos += len(chunk)
            dst_pos += len(chunk)
            length -= len(chunk)
    except OSError as exc:
        raise from_os_error(path, exc, "copying data") from None


def tail_offset(size: int) -> int:
    """Where the tail footer lies in a file of ``size`` bytes.

    The one place that decides where an image ends (Image.end(), check and
    repair use it): an image inside a logical volume larger than the image
    changes this, not its callers.
    """
    return size - fmt.FOOTER_SIZE


def check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, not {value!r}")


_FULL: dict[int, bytes] = {}


def _full_bitmap(size: int) -> bytes:
    raw = _FULL.get(size)
    if raw is None:
        raw = _FULL[size] = b"\xff" * size
    return raw


def open_image(path: str | os.PathLike[str], *, writable: bool = False,
               search_dirs: list[str] | None = None) -> Image:
    """Open ``path`` and its whole chain; every failure is a VhdError."""
    try:
        return Image.open(path, writable=writable, search_dirs=search_dirs)
    except VhdError:
        raise
    except (OSError, ValueError, OverflowError, MemoryError) as exc:  # defensive
        raise Corrupt(f"{os.fspath(path)}: cannot be read as a VHD ({type(exc).__name__}: {exc})") from None


__all__ = ["LOCATOR_ORDER", "Image", "Info", "NotFound", "open_image"]
