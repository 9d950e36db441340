"""Creating new images: dynamic, fixed, differencing (snapshot), and the parent locators.

Owns the layout of new files (see ``smcommon.vhd.image``'s docstring), with
the batmap libvhd requires, and the all-or-nothing creation of a file: an
image is built under a temporary name in the destination directory, fsync'd,
then linked to its name (never replacing an existing file), so an error or a
kill leaves no half-made image behind; an existing block device (a logical
volume) is written in place instead (its owner keeps a half-made one out of
sight).  Parent locators are written as libvhd
writes them: the parent's path relative to the child's directory in all
three (W2RU and W2KU ``.\\name`` in UTF-16LE, MACX ``file://./name``), each
in the whole sectors its data needs, ``data_space`` counted in sectors (a
value below 512, which libvhd, libvhdi and the specification read alike).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from smcommon import ids
from smcommon.record import record
from smcommon.vhd import format as fmt
from smcommon.vhd.batmap import Batmap
from smcommon.vhd.errors import (
    AlreadyExists,
    InvalidArgument,
    ParentNotAllowed,
    TooLarge,
    VhdError,
    from_os_error,
)
from smcommon.vhd.image import LOCATOR_AREA, LOCATOR_ORDER, Image, Info, open_image
from smcommon.vhd.parents import image_place, is_block_device

HEADER_AT = fmt.FOOTER_SIZE
AFTER_HEADER = HEADER_AT + fmt.HEADER_SIZE
MAX_LOCATOR = 8192          # bytes of one locator's data


def check_size(size: object, what: str = "size") -> int:
    """``size`` rounded up to a 2 MiB multiple; InvalidArgument/TooLarge if unusable."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"{what} must be an integer number of bytes, not {size!r}")
    if size <= 0:
        raise InvalidArgument(f"{what} must be positive, not {size}")
    rounded = fmt.round_up(size, fmt.BLOCK_SIZE)
    if rounded > fmt.MAX_VIRTUAL_SIZE:
        raise TooLarge(f"{what} {size} is above the VHD maximum of {fmt.MAX_VIRTUAL_SIZE} "
                       "bytes (2040 GiB)")
    return rounded


@contextlib.contextmanager
def new_file(path: str) -> Iterator[int]:
    """An fd on a nameless file that becomes ``path`` only if the block succeeds.

    O_TMPFILE: the file has no name until it is complete and fsync'd, then
    linkat() names it (never replacing an existing file), so a kill at any
    instant leaves nothing behind.  Where O_TMPFILE is not supported, a
    hidden temporary name is used (and removed on error).
    """
    path = os.path.abspath(path)
    if is_block_device(path):
        with _in_device(path) as fd:
            yield fd
        return
    if os.path.lexists(path):
        raise AlreadyExists(f"{path}: already exists")
    directory = os.path.dirname(path)
    tmp: str | None = None
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise from_os_error(path, exc, "creating the image") from None
        tmp = os.path.join(directory, f".vhd-tmp-{ids.new_bytes().hex()[:16]}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc2:
            raise from_os_error(path, exc2, "creating the image") from None
    try:
        yield fd
        os.fsync(fd)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                if tmp is None:
                    _link_tmpfile(fd, dfd, path)
                else:
                    os.link(tmp, path)
            except OSError as exc:
                raise from_os_error(path, exc, "naming the new image") from None
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise from_os_error(path, exc, "creating the image") from None
    finally:
        os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def _in_device(path: str) -> Iterator[int]:
    """An fd on a block device (a logical volume) to write a new image into, in place."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise from_os_error(path, exc, "opening the device") from None
    try:
        yield fd
        os.fsync(fd)
    except OSError as exc:
        raise from_os_error(path, exc, "writing the image") from None
    finally:
        os.close(fd)


def _link_tmpfile(fd: int, dfd: int, path: str) -> None:
    """Name an O_TMPFILE file; where linkat through /proc is refused, copy it instead."""
    name = os.path.basename(path)
    try:
        # a dir fd makes CPython call linkat(AT_SYMLINK_FOLLOW), not link()
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EOPNOTSUPP):
            raise
    tmp = f".vhd-tmp-{ids.new_bytes().hex()[:16]}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        size = os.fstat(fd).st_size
        os.ftruncate(out, size)
        pos = 0
        while pos < size:                   # copy the data segments, keep the holes
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                stop = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break
            while start < stop:
                chunk = os.pread(fd, min(stop - start, 8 << 20), start)
                if not chunk:
                    break
                _pwrite_all(out, chunk, start)
                start += len(chunk)
            pos = stop
        os.fsync(out)
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, pos)
        view = view[done:]
        pos += done


@record(frozen=True)
class NewLayout:
    """Where a freshly written dynamic/differencing image put things."""

    end: int                 # the tail footer's offset: the first block goes here
    table_offset: int
    batmap: Batmap
    footer: fmt.Footer


def place_locators(payloads: list[tuple[bytes, bytes]], at: int) -> list[fmt.Locator]:
    """Locator entries for (code, data) laid one after another from ``at``, each
    in the whole sectors its data needs (at least one), data_space in sectors."""
    out: list[fmt.Locator] = []
    for code, data in payloads:
        space = locator_space_for(data)
        out.append(fmt.Locator(code, space // fmt.SECTOR, len(data), 0, at))
        at += space
    return out


def locator_space_for(data: bytes) -> int:
    return max(fmt.SECTOR, fmt.round_up(len(data), fmt.SECTOR))


def locator_bytes(locators: list[fmt.Locator], payloads: list[tuple[bytes, bytes]]) -> bytes:
    """The locators' data as one run (each padded with zeros to its space)."""
    return b"".join(data + bytes(loc.data_space * fmt.SECTOR - len(data))
                    for loc, (_, data) in zip(locators, payloads, strict=True))


def write_dynamic_layout(
    fd: int,
    size: int,
    entries: int,
    *,
    disk_type: int = fmt.DISK_DYNAMIC,
    block_size: int = fmt.BLOCK_SIZE,
    parent: tuple[bytes, int, str, list[tuple[bytes, bytes]]] | None = None,
    uuid: bytes | None = None,
) -> NewLayout:
    """Write a new empty dynamic/differencing image into ``fd`` (``parent`` is
    (uuid, timestamp, name, [(locator code, data)])): footer copy, header,
    locators (differencing), BAT, empty batmap, footer."""
    if parent is not None:
        table_offset = AFTER_HEADER + LOCATOR_AREA
        puuid, pts, pname, payloads = parent
        locators = place_locators(payloads, AFTER_HEADER)
        header = fmt.Header.new(table_offset, entries, block_size, puuid, pts, pname, locators)
        _pwrite_all(fd, locator_bytes(locators, payloads), AFTER_HEADER)
    else:
        table_offset = AFTER_HEADER
        header = fmt.Header.new(table_offset, entries, block_size)
    footer = fmt.Footer.new(size, disk_type, uuid or ids.new_bytes(), HEADER_AT)
    batmap = Batmap.new(table_offset, entries)
    end = batmap.map_offset + batmap.map_bytes
    _pwrite_all(fd, footer.to_bytes(), 0)
    _pwrite_all(fd, header.to_bytes(), HEADER_AT)
    _pwrite_all(fd, fmt.Bat.empty(entries).to_bytes(), table_offset)
    for at, raw in batmap.whole(size):
        _pwrite_all(fd, raw, at)
    _pwrite_all(fd, footer.to_bytes(), end)
    return NewLayout(end, table_offset, batmap, footer)


def create(
    path: str | os.PathLike[str],
    size: int,
    *,
    fixed: bool = False,
    max_size: int | None = None,
) -> Info:
    """A new empty image of ``size`` bytes rounded up to 2 MiB (Info tells the size used).

    ``max_size`` preallocates BAT entries so that growing up to it is metadata only.
    """
    path = os.fspath(path)
    size = check_size(size)
    entries = fmt.blocks_for(size, fmt.BLOCK_SIZE)
    if max_size is not None:
        if fixed:
            raise InvalidArgument("max_size applies to dynamic images, not fixed ones")
        max_size = check_size(max_size, "max_size")
        if max_size < size:
            raise InvalidArgument(f"max_size {max_size} is smaller than the size {size}")
        entries = fmt.blocks_for(max_size, fmt.BLOCK_SIZE)
    with new_file(path) as fd:
        if fixed:
            os.ftruncate(fd, size)
            footer = fmt.Footer.new(size, fmt.DISK_FIXED, ids.new_bytes(), fmt.NO_OFFSET)
            _pwrite_all(fd, footer.to_bytes(), size)
        else:
            write_dynamic_layout(fd, size, entries)
    return info_of(path)


def info_of(path: str, search_dirs: list[str] | None = None) -> Info:
    with open_image(path, search_dirs=search_dirs) as img:
        return img.info()


def parent_locators(
    child: str, parent: str, codes: tuple[bytes, ...] = LOCATOR_ORDER
) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The parent's name and (code, data) of each locator, as libvhd writes them:
    the path relative to the child's directory (W2RU/W2KU ``.\\a.vhd``, MACX
    ``file://./a.vhd``)."""
    child_dir = os.path.dirname(image_place(child))
    parent_abs = image_place(parent)
    rel = os.path.relpath(parent_abs, child_dir)
    if not rel.startswith("../"):
        rel = "./" + rel
    out: list[tuple[bytes, bytes]] = []
    for code in codes:
        text = rel if code == fmt.LOC_MACX else ".\\" + rel.removeprefix("./").replace("/", "\\")
        data = fmt.encode_locator(code, text)
        if len(data) > MAX_LOCATOR:
            raise InvalidArgument(f"{parent}: path too long for a parent locator "
                                  f"({len(data)} bytes, at most {MAX_LOCATOR})")
        out.append((code, data))
    return os.path.basename(parent_abs), out


def check_parent_allowed(child: str, parent: str, search_dirs: list[str] | None) -> None:
    child_dir = os.path.dirname(image_place(child))
    roots = [os.path.realpath(d) for d in (search_dirs or [child_dir])]
    real = image_place(parent)
    if not any(os.path.commonpath([real, r]) == r for r in roots):
        raise ParentNotAllowed(f"{parent}: parent outside the allowed directories "
                               f"({', '.join(roots)}) of {child}")


def snapshot(
    parent: str | os.PathLike[str],
    child: str | os.PathLike[str],
    *,
    search_dirs: list[str] | None = None,
) -> Info:
    """A new empty differencing image ``child`` whose parent is ``parent``."""
    parent, child = os.fspath(parent), os.fspath(child)
    check_parent_allowed(child, parent, search_dirs)
    with open_image(parent, search_dirs=search_dirs) as pimg:
        if pimg.tail_damaged:
            raise VhdError(f"{parent}: tail footer damaged; run repair first")
        size = pimg.virtual_size
        if pimg.header is not None:
            entries, block_size = pimg.header.max_table_entries, pimg.header.block_size
        else:
            entries, block_size = fmt.blocks_for(size, fmt.BLOCK_SIZE), fmt.BLOCK_SIZE
        entries = max(entries, fmt.blocks_for(size, block_size))
        name, payloads = parent_locators(child, parent)
        parent_info = (pimg.footer.uuid, pimg.footer.timestamp, name, payloads)
        with new_file(child) as fd:
            write_dynamic_layout(fd, size, entries, disk_type=fmt.DISK_DIFFERENCING,
                                 block_size=block_size, parent=parent_info)
    return info_of(child, search_dirs)


def open_for_write(path: str, search_dirs: list[str] | None = None) -> Image:
    return open_image(path, writable=True, search_dirs=search_dirs)
