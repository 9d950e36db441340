"""Opening and reading a VHD image over its chain of parents.

Owns ``ImageReader``, the read side of ``smcommon.vhd.image.Image``: one open
file descriptor, the parsed footer, header and BAT (the entries that map the
disk), the batmap of a writable open, the opened parent chain (parents found
by ``smcommon.vhd.parents``), the reads through the chain, ``Info``, and where
the image ends: ``end()`` decides it in one place.  A file ends with its tail
footer (``tail_offset``); an image inside a block device (a logical volume,
larger than the image) ends after its last metadata or data block
(``device_tail``), and ``_set_end()`` refuses to grow it past the device.
Parents of an image in a block device are named relative to the directory
that names the device (``parents.image_place``).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable

from smcommon.vhd import batmap as bmap
from smcommon.vhd import format as fmt
from smcommon.vhd import layout, parents
from smcommon.vhd.errors import (
    ChainTooDeep,
    Corrupt,
    InvalidArgument,
    NoSpace,
    NotFound,
    ParentLoop,
    ParentMismatch,
    ParentMissing,
    VhdError,
    from_os_error,
)
from smcommon.vhd.info import Info, format_uuid
from smcommon.vhd.layout import first_block_problem
from smcommon.vhd.locks import lock_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

MAX_CHAIN_DEPTH = 64
OPEN_RETRIES = 5           # opens that race a collector's re-link or rename (_load_and_link)
OPEN_RETRY_PAUSE = 0.005
# footer copy, dynamic header and the locator area (image.LOCATOR_AREA) after it
_HEAD_PEEK = fmt.FOOTER_SIZE + fmt.HEADER_SIZE + 3 * 8192

class ImageReader:
    """One open VHD file and, for a differencing disk, its opened parent chain (read side)."""

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.writable = writable
        self.footer: fmt.Footer
        self.header: fmt.Header | None = None
        self.bat: fmt.Bat | None = None
        self.parent: ImageReader | None = None
        self.depth = 1
        self.tail_damaged = False
        self._size = 0
        self.in_device = False          # the image lives in a block device
        self._end: int | None = None    # its tail footer's offset (devices only)
        self._tail_stale = False        # device: no valid footer at the end yet
        self.batmap: bmap.Batmap | None = None
        self.batmap_problem: str | None = None
        self.repairing = False            # repair writes through a damaged batmap
        self._filled: set[int] = set()    # blocks made full, their batmap bits not set yet
        self._seen_head = b""             # the first bytes when loaded (_header_changed)

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        search_dirs: list[str] | None = None,
        parents: bool = True,
        lock: bool = True,
        lock_timeout: float | None = None,
        _seen: set[tuple[int, int]] | None = None,
        _depth: int = 1,
    ) -> Self:
        """Open ``path`` (and, with ``parents``, its chain, read-only).

        The image is locked (exclusive if ``writable``, else shared; Busy after
        ``lock_timeout``, default ``locks.LOCK_TIMEOUT``) unless ``lock`` is
        False: only for a writer that knows no reader can see what it writes
        (a coalesce into a parent every reader reads through the child).
        """
        path = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        for attempt in range(OPEN_RETRIES):
            try:
                fd = os.open(path, flags)
            except OSError as exc:
                raise from_os_error(path, exc, "opening the image") from None
            img = cls(path, fd, writable)
            try:
                st = os.fstat(fd)
                img.in_device = stat.S_ISBLK(st.st_mode)
                if not (img.in_device or stat.S_ISREG(st.st_mode)):
                    raise InvalidArgument(f"{path}: not a regular file or a block device")
                seen = set() if _seen is None else _seen
                key = node_key(st)
                if key in seen:
                    raise ParentLoop(f"{path}: parent loop (this image is its own ancestor)")
                if lock:
                    lock_file(fd, path, exclusive=writable, timeout=lock_timeout)
                if not _still_named(path, st) and attempt + 1 < OPEN_RETRIES:
                    img.close()     # renamed over while we waited for the lock
                    continue
                seen.add(key)
                img._size = storage_size(fd)           # after the lock: a writer may have grown it
                img.depth = _depth
                img._load_and_link(parents, search_dirs, seen, _depth)
            except BaseException:
                img.close()
                raise
            return img
        raise AssertionError("unreachable")

    def _load_and_link(self, parents: bool, search_dirs: list[str] | None,
                       seen: set[tuple[int, int]], depth: int) -> None:
        """Load the metadata and open the parent chain.

        A collector may re-link a child whose backend holds it open (its
        header is rewritten without the image lock, see docs/design.md,
        "Chains of running VMs"): a failure to read the header or to find
        the parent is retried when the header bytes changed meanwhile, so an
        open racing a re-link sees the old or the new parent, never an error.
        """
        for attempt in range(OPEN_RETRIES):
            try:
                self._link(parents, search_dirs, seen, depth)
                return
            except (Corrupt, ParentMissing, ParentMismatch, NotFound):
                if self.parent is not None:
                    self.parent.close()
                    self.parent = None
                if attempt + 1 >= OPEN_RETRIES or not self._header_changed():
                    raise
                time.sleep(OPEN_RETRY_PAUSE * (attempt + 1))

    def _link(self, parents: bool, search_dirs: list[str] | None,
              seen: set[tuple[int, int]], depth: int) -> None:
        path = self.path
        self._load()
        if self.writable:
            self._heal_head()
        if parents and self.footer.disk_type == fmt.DISK_DIFFERENCING:
            if depth >= MAX_CHAIN_DEPTH:
                raise ChainTooDeep(f"{path}: chain deeper than {MAX_CHAIN_DEPTH} images")
            ppath = self.find_parent(search_dirs)
            self.parent = type(self).open(
                ppath, search_dirs=search_dirs, _seen=set(seen), _depth=depth + 1
            )
            if not self.parent.is_fixed and self.parent.block_size != self.block_size:
                raise Corrupt(f"{path}: block size {self.block_size} differs from its "
                              f"parent's {self.parent.block_size} ({ppath})")
            if self.parent.footer.uuid != self.header_or_fail().parent_uuid:
                raise ParentMismatch(
                    f"{path}: parent {ppath} has UUID "
                    f"{format_uuid(self.parent.footer.uuid)}, expected "
                    f"{format_uuid(self.header_or_fail().parent_uuid)}"
                )

    def _header_changed(self) -> bool:
        """Whether the metadata a parent link depends on changed since it was read."""
        try:
            head = self._pread(_HEAD_PEEK, 0, "the header")
        except VhdError:
            return False
        return head != self._seen_head

    def _pread(self, length: int, offset: int, what: str) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise from_os_error(self.path, exc, f"reading {what}") from None
        return data

    def _load(self) -> None:
        path = self.path
        self._seen_head = self._pread(_HEAD_PEEK, 0, "the header")
        if self._size < fmt.FOOTER_SIZE:
            raise Corrupt(f"{path}: file of {self._size} bytes is too small for a VHD footer")
        if self.in_device:
            self._end = device_tail(lambda n, at: self._pread(n, at, "metadata"),
                                    self._size, path)
        raw = self._pread(fmt.FOOTER_SIZE, self.end(), "the footer")
        try:
            self.footer = fmt.Footer.from_bytes(raw, f"{path}: footer")
            if self.in_device and self.footer.disk_type != fmt.DISK_FIXED:
                self._check_tail_is_ours()
        except Corrupt as tail_exc:
            # blktap keeps a copy at offset 0: read through it, refuse writes
            try:
                head = fmt.Footer.from_bytes(self._pread(512, 0, "footer copy"), "copy")
            except Corrupt:
                raise tail_exc from None
            if head.disk_type == fmt.DISK_FIXED:
                raise tail_exc from None
            self.footer = head
            if self.in_device:
                # a writer killed mid-allocation wrote over the tail: the copy
                # is the footer (a writable open puts the tail back)
                self._tail_stale = True
            else:
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

    def _check_tail_is_ours(self) -> None:
        """In a device, a footer of another image (stale bytes of an earlier
        volume where ours ends) must not win over the copy."""
        try:
            head = fmt.Footer.from_bytes(self._pread(fmt.FOOTER_SIZE, 0, "the footer copy"))
        except Corrupt:
            return  # a damaged copy: the tail stands (repair restores the copy)
        if head.uuid != self.footer.uuid:
            raise Corrupt(f"{self.path}: the footer at the end of the image is not its own")

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
        """Bring a stale footer copy (an update killed after the tail write) up to date;
        in a device, put back a tail footer a killed allocation wrote over."""
        if self._tail_stale:
            self._pwrite(self.footer.to_bytes(), self.end(), "the footer")
            self.sync()
            self._tail_stale = False
            return
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
        if self._end is not None:
            return self._end
        return tail_offset(self._size)

    def _set_end(self, new_end: int) -> None:
        """Write the footer at ``new_end`` (growing the file): the old end becomes free."""
        if self.in_device and new_end + fmt.FOOTER_SIZE > self._size:
            raise NoSpace(f"{self.path}: the image needs {new_end + fmt.FOOTER_SIZE} bytes, "
                          f"its device has {self._size}: grow the device first")
        self._pwrite(self.footer.to_bytes(), new_end, "the footer")
        if self.in_device:
            self._end = new_end
        else:
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

    def chain(self) -> list[ImageReader]:
        out: list[ImageReader] = []
        img: ImageReader | None = self
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
        img: ImageReader | None = self
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

    # --- low-level I/O -----------------------------------------------------------

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


def tail_offset(size: int) -> int:
    """Where the tail footer lies in a file of ``size`` bytes.

    With ``device_tail`` the one place that decides where an image ends
    (Image.end(), check and repair use them).
    """
    return size - fmt.FOOTER_SIZE


def _still_named(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``st`` describes (not renamed over)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return node_key(now) == node_key(st)


def device_tail(pread: Callable[[int, int], bytes], size: int, path: str = "") -> int:
    """Where the tail footer of an image inside a block device of ``size`` bytes lies.

    A logical volume is larger than the image it holds, and what follows the
    image is stale: the image ends right after its last structure.  That end is
    found from the footer copy at offset 0 (dynamic and differencing images
    keep one), the header it points at (where images keep it, right after the
    copy, if the copy is damaged), the BAT, the batmap (where libvhd wants
    one) and the parent locators: the furthest of their regions and of the
    data blocks.  Without either (a fixed disk) the image fills the device:
    its footer is the last sector.  ``pread(length, offset)`` reads the device.
    """
    try:
        head: fmt.Footer | None = fmt.Footer.from_bytes(pread(fmt.FOOTER_SIZE, 0),
                                                         f"{path}: footer copy")
    except Corrupt:
        head = None
    if head is not None and head.disk_type == fmt.DISK_FIXED:
        return tail_offset(size)
    hoff = head.data_offset if head is not None else fmt.FOOTER_SIZE
    if hoff < fmt.FOOTER_SIZE or hoff + fmt.HEADER_SIZE > size:
        raise Corrupt(f"{path}: dynamic header offset {hoff} outside the device")
    try:
        header = fmt.Header.from_bytes(pread(fmt.HEADER_SIZE, hoff), f"{path}: dynamic header")
        header.validate(f"{path}: dynamic header")
    except Corrupt:
        if head is None:  # no copy and no header where images keep it: a fixed disk
            return tail_offset(size)
        raise
    entries = header.max_table_entries
    if head is not None:
        entries = min(entries, fmt.blocks_for(head.current_size, header.block_size))
    if header.table_offset + fmt.bat_bytes(header.max_table_entries) > size:
        raise Corrupt(f"{path}: BAT ({header.max_table_entries} entries at "
                      f"{header.table_offset}) lies outside the device")
    batmap = None
    if head is None or bmap.expected(head) is not False:
        at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
        if at + fmt.BATMAP_HEADER_SIZE <= size:
            try:
                batmap = fmt.BatmapHeader.from_bytes(pread(fmt.BATMAP_HEADER_SIZE, at))
            except Corrupt:
                batmap = None
            if batmap is not None and \
                    batmap.batmap_offset + batmap.batmap_size * fmt.SECTOR > size:
                batmap = None
    ends = [layout.end_of_headers(layout.metadata_regions(hoff, header, batmap))]
    bat = fmt.Bat.from_bytes(pread(4 * entries, header.table_offset), entries)
    offsets = bat.offsets()
    if offsets:
        ends.append(offsets[-1] * fmt.SECTOR + header.bitmap_size + header.block_size)
    end = fmt.round_up(max(ends), fmt.SECTOR)
    if end + fmt.FOOTER_SIZE > size:
        raise Corrupt(f"{path}: the image ends at {end + fmt.FOOTER_SIZE}, past the end of "
                      f"its device ({size} bytes)")
    return end


def node_key(st: os.stat_result) -> tuple[int, int]:
    """What identifies an image's storage: a file's inode, a block device's number."""
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def storage_size(fd: int) -> int:
    """Bytes of a file, or of a block device (whose st_size is 0)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, not {value!r}")


_FULL: dict[int, bytes] = {}


def _full_bitmap(size: int) -> bytes:
    raw = _FULL.get(size)
    if raw is None:
        raw = _FULL[size] = b"\xff" * size
    return raw
