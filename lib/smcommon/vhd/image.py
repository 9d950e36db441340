"""The ``Image`` object: an open VHD image over its chain, read and written.

Reading, opening and the chain are ``smcommon.vhd.reader.ImageReader``'s;
this module owns the writes: crash-safe block allocation (data and bitmap,
fdatasync, BAT entry, fdatasync, then the batmap bits of blocks made full),
in-place writes, moving blocks, footer and header updates.

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

from smcommon.vhd import format as fmt
from smcommon.vhd import layout
from smcommon.vhd.errors import (
    Corrupt,
    InvalidArgument,
    NotFound,
    ReadOnly,
    VhdError,
    from_os_error,
)
from smcommon.vhd.info import Info
from smcommon.vhd.locks import lock_file
from smcommon.vhd.parents import LOCATOR_ORDER
from smcommon.vhd.reader import (
    MAX_CHAIN_DEPTH,
    ImageReader,
    _full_bitmap,
    check_int,
    device_tail,
    node_key,
    storage_size,
    tail_offset,
)

LOCATOR_AREA = 3 * 8192


class Image(ImageReader):
    """One open VHD file and its opened parent chain; writable when opened so."""

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
        if count:
            self._set_end(base + (count - 1) * self.block_stride + header.bitmap_size
                          + header.block_size)
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
        self._size = storage_size(self.fd)
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


def open_image(path: str | os.PathLike[str], *, writable: bool = False,
               search_dirs: list[str] | None = None) -> Image:
    """Open ``path`` and its whole chain; every failure is a VhdError."""
    try:
        return Image.open(path, writable=writable, search_dirs=search_dirs)
    except VhdError:
        raise
    except (OSError, ValueError, OverflowError, MemoryError) as exc:  # defensive
        raise Corrupt(f"{os.fspath(path)}: cannot be read as a VHD ({type(exc).__name__}: {exc})") from None


__all__ = ["LOCATOR_AREA", "LOCATOR_ORDER", "MAX_CHAIN_DEPTH", "Image", "Info", "NotFound",
           "check_int", "device_tail", "node_key", "open_image", "storage_size", "tail_offset"]
