"""Moving whole disks in and out: export to raw, import from raw, flatten (convert).

Owns the bulk paths, written for throughput: whole blocks with os.pread /
os.pwritev, os.copy_file_range where a block is copied as it is, and zero
blocks detected with one bytes comparison (a memcmp) so they stay
unallocated (or holes in a raw file).  New images are built under a temporary
name and linked into place at the end (see ``create.new_file``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from smcommon import ids, progress
from smcommon.vhd import format as fmt
from smcommon.vhd import layout
from smcommon.vhd.create import check_size, new_file, write_dynamic_layout
from smcommon.vhd.errors import InvalidArgument, TooLarge, from_os_error
from smcommon.vhd.image import Image, Info, copy_range, node_key, open_image
from smcommon.vhd.ops import info

BS = fmt.BLOCK_SIZE
ZERO_BLOCK = bytes(BS)
FULL_BITMAP = b"\xff" * fmt.bitmap_size(BS)


def export_raw(path: str | os.PathLike[str], dest: str | os.PathLike[str], *,
               search_dirs: list[str] | None = None) -> None:
    """Write the whole chain's disk to ``dest`` as raw (a sparse file or a block device)."""
    path, dest = os.fspath(path), os.fspath(dest)
    with open_image(path, search_dirs=search_dirs) as img:
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise from_os_error(dest, exc, "opening the export destination") from None
        try:
            _export(img, out, dest)
        except OSError as exc:
            raise from_os_error(dest, exc, "exporting") from None
        finally:
            os.close(out)


def _export(img: Image, out: int, dest: str) -> None:
    vsize = img.virtual_size
    ost = os.fstat(out)
    for i in img.chain():
        if node_key(os.fstat(i.fd)) == node_key(ost):
            raise InvalidArgument(f"{dest}: is {i.path}, an image of the chain being exported")
    is_blockdev = stat.S_ISBLK(os.fstat(out).st_mode)
    if is_blockdev:
        if os.lseek(out, 0, os.SEEK_END) < vsize:
            raise InvalidArgument(f"{dest}: device smaller than the disk ({vsize} bytes)")
    else:
        os.ftruncate(out, 0)
        os.ftruncate(out, vsize)
    images = img.chain()
    if len(images) == 1 and img.is_fixed:
        copy_range(img.fd, out, 0, 0, vsize, img.path)
        os.fsync(out)
        return
    bs = img.block_size
    allocated: set[int] = set()
    for i in images:
        if i.bat is not None:
            allocated.update(i.bat.allocated())
    has_fixed = any(i.is_fixed for i in images)
    zero = bytes(bs)
    with progress.track("export", vsize) as done:
        for block in range(fmt.blocks_for(vsize, bs)):
            base = block * bs
            n = min(bs, vsize - base)
            done.set(base)
            if block not in allocated and not has_fixed:
                if is_blockdev:
                    os.pwrite(out, zero[:n], base)
                continue
            pos = img.block_pos(block)
            if pos is not None and n == bs and img.bitmap(block, pos) == -1:
                copy_range(img.fd, out, pos + img.bitmap_size, base, n, img.path)
                continue
            buf = bytearray(fmt.round_up(n, fmt.SECTOR))
            img.read_into(memoryview(buf), base)
            if is_blockdev or buf != zero[: len(buf)]:
                os.pwrite(out, memoryview(buf)[:n], base)
        os.fsync(out)
        done.set(vsize)


def import_raw(src: str | os.PathLike[str], path: str | os.PathLike[str], *,
               fixed: bool = False) -> Info:
    """A new image holding raw file (or device) ``src``; all-zero blocks stay unallocated."""
    src, path = os.fspath(src), os.fspath(path)
    try:
        sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_os_error(src, exc, "opening the raw source") from None
    try:
        src_size = os.lseek(sfd, 0, os.SEEK_END)
        if src_size == 0:
            raise InvalidArgument(f"{src}: empty source")
        if src_size > fmt.MAX_VIRTUAL_SIZE:
            raise TooLarge(f"{src}: {src_size} bytes is above the VHD maximum (2040 GiB)")
        size = check_size(src_size)

        holes = _HoleFinder(sfd)

        def reader(block: int) -> bytes | None:
            if holes.is_hole(block * BS, BS):
                return None
            data = os.pread(sfd, BS, block * BS)
            if len(data) < BS:
                data += ZERO_BLOCK[len(data) :]
            return None if data == ZERO_BLOCK else data

        _build(path, size, reader, fixed=fixed, nblocks=fmt.blocks_for(src_size, BS))
    except OSError as exc:
        raise from_os_error(src, exc, "importing") from None
    finally:
        os.close(sfd)
    return info(path)


def convert(src_vhd: str | os.PathLike[str], dest_vhd: str | os.PathLike[str], *,
            search_dirs: list[str] | None = None) -> Info:
    """Flatten the chain of ``src_vhd`` into a new sparse dynamic image ``dest_vhd``."""
    src_vhd, dest_vhd = os.fspath(src_vhd), os.fspath(dest_vhd)
    with open_image(src_vhd, search_dirs=search_dirs) as img:
        images = img.chain()
        allocated: set[int] = set()
        any_fixed = any(i.is_fixed for i in images)
        for i in images:
            if i.bat is not None:
                src_bs = i.block_size
                for b in i.bat.allocated():
                    allocated.update(range(b * src_bs // BS, ((b + 1) * src_bs - 1) // BS + 1))
        vsize = img.virtual_size

        def reader(block: int) -> bytes | None:
            if not any_fixed and block not in allocated:
                return None
            buf = bytearray(BS)
            n = min(BS, vsize - block * BS)
            img.read_into(memoryview(buf)[: fmt.round_up(n, fmt.SECTOR)], block * BS)
            return None if buf == ZERO_BLOCK else bytes(buf)

        try:
            _build(dest_vhd, vsize, reader, fixed=False, nblocks=fmt.blocks_for(vsize, BS),
                   what="copy")
        except OSError as exc:
            raise from_os_error(dest_vhd, exc, "converting") from None
    return info(dest_vhd)


class _HoleFinder:
    """Whole holes of a sparse source found with SEEK_DATA, so they are never read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.next_data = 0
        self.usable = True

    def is_hole(self, offset: int, length: int) -> bool:
        if not self.usable:
            return False
        if offset < self.next_data:
            return offset + length <= self.next_data
        try:
            self.next_data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:        # no data from here to the end
                self.next_data = 1 << 62
            else:                               # not supported here: read everything
                self.usable = False
                return False
        return offset + length <= self.next_data


def _build(path: str, size: int, reader: Callable[[int], bytes | None], *, fixed: bool,
           nblocks: int, what: str = "import") -> None:
    """Build a new image of ``size`` from ``reader(block) -> data or None (all zeros)``.

    Bulk path: no fsync per block; ``new_file`` fsyncs once and only then links
    the image into place, so a kill leaves no image at all, never half of one.
    """
    with new_file(path) as fd, progress.track(what, nblocks * BS) as done:
        if fixed:
            os.ftruncate(fd, size)
            for block in range(nblocks):
                done.set(block * BS)
                data = reader(block)
                if data is not None:
                    os.pwrite(fd, data[: min(BS, size - block * BS)], block * BS)
            footer = fmt.Footer.new(size, fmt.DISK_FIXED, ids.new_bytes(), fmt.NO_OFFSET)
            os.pwrite(fd, footer.to_bytes(), size)
            return
        entries = fmt.blocks_for(size, BS)
        new = write_dynamic_layout(fd, size, entries)
        bat = fmt.Bat.empty(entries)
        pos = layout.block_at(new.end, len(FULL_BITMAP))
        stride = layout.block_stride(len(FULL_BITMAP), BS)
        end = new.end
        for block in range(nblocks):
            done.set(block * BS)
            data = reader(block)
            if data is not None:
                os.pwritev(fd, [FULL_BITMAP, data], pos)
                bat[block] = pos // fmt.SECTOR
                end = pos + len(FULL_BITMAP) + BS
                pos += stride
        os.pwrite(fd, bat.to_bytes(), new.table_offset)
        new.batmap.change(size, BS, full=bat.allocated())      # every block is full
        for at, raw in new.batmap.whole(size):
            os.pwrite(fd, raw, at)
        os.pwrite(fd, new.footer.to_bytes(), end)
