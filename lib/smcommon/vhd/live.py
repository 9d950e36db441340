"""Images a long-lived backend holds open: reading their links, re-linking them.

A VM backend (tapdisk, or a writer modelled on it) opens its chain once: the
leaf read-write (the exclusive image lock), each parent read-only (a shared
lock), and keeps them open as long as the VM runs.  Waiting for those locks
would wait for the VM to stop, so the functions here never take the image's
own lock:

- ``peek(path)``: what an image says about itself and its parent (footer,
  header, the parent's path), without the lock and without the BAT.  A
  backend appending blocks may overwrite the old tail footer at any moment;
  the footer copy at offset 0 stands in for it then.
- ``set_parent_live(child, parent)``: the re-link of ``set_parent`` without
  the child's lock.  Safe only because a backend never reads a header or a
  locator again once its chain is open, and never writes them; the
  locators go into free room (never moving a block), then one header write
  switches to them; a concurrent open sees the old or the new link
  (``ImageReader.open`` retries a torn header read).  Why the
  collector may do this is in docs/design.md ("Chains of running VMs").
"""

from __future__ import annotations

import os
import stat
import time

from smcommon.record import record
from smcommon.vhd import format as fmt
from smcommon.vhd.create import check_parent_allowed
from smcommon.vhd.errors import Corrupt, InvalidArgument, ParentMissing, from_os_error
from smcommon.vhd.image import Image
from smcommon.vhd.info import format_uuid
from smcommon.vhd.ops import write_parent_link
from smcommon.vhd.reader import (
    OPEN_RETRIES,
    OPEN_RETRY_PAUSE,
    device_tail,
    storage_size,
)


@record(frozen=True)
class Head:
    """What an image's footer and header say (no BAT, no parent opened)."""

    path: str
    uuid: str
    disk_type: str
    virtual_size: int
    hidden: bool
    parent: str | None          # the parent's path, as the locators resolve it
    parent_uuid: str | None


def peek(path: str | os.PathLike[str], *, search_dirs: list[str] | None = None) -> Head:
    """Footer, header and parent path of ``path``, without its lock."""
    path = os.fspath(path)
    img = _open_unlocked(path, writable=False)
    try:
        for attempt in range(OPEN_RETRIES):
            try:
                _load_head(img)
                parent = None
                if img.footer.disk_type == fmt.DISK_DIFFERENCING:
                    parent = img.find_parent(search_dirs)
                hdr = img.header
                return Head(
                    path=path,
                    uuid=format_uuid(img.footer.uuid),
                    disk_type=img.footer.type_name,
                    virtual_size=img.virtual_size,
                    hidden=bool(img.footer.hidden),
                    parent=parent,
                    parent_uuid=format_uuid(hdr.parent_uuid)
                    if hdr is not None and parent is not None else None,
                )
            except (Corrupt, ParentMissing):
                # a torn read of a header being rewritten, or a parent being renamed
                if attempt + 1 >= OPEN_RETRIES:
                    raise
                time.sleep(OPEN_RETRY_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")
    finally:
        img.close()


def set_parent_live(
    child: str | os.PathLike[str],
    parent: str | os.PathLike[str],
    *,
    search_dirs: list[str] | None = None,
) -> None:
    """Re-link ``child`` to ``parent`` while a backend holds ``child`` open.

    Writes only the child's locator slots and its dynamic header (the backend
    writes blocks, the BAT and the tail footer, never these bytes), locators
    first, then the header in one write.  The caller guarantees that ``parent``
    reads, for every sector the child does not have, what the child's current
    parent reads.
    """
    child, parent = os.fspath(child), os.fspath(parent)
    check_parent_allowed(child, parent, search_dirs)
    img = _open_unlocked(child, writable=True)
    try:
        _load_head(img)
        _load_bat(img)
        # locators only into free room: moving a block would move it under the backend
        write_parent_link(img, parent, search_dirs, may_move=False)
    finally:
        img.close()


def _open_unlocked(path: str, writable: bool) -> Image:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise from_os_error(path, exc, "opening the image") from None
    img = Image(path, fd, writable)
    try:
        mode = os.fstat(fd).st_mode
        img.in_device = stat.S_ISBLK(mode)  # an image in a logical volume
        if not (img.in_device or stat.S_ISREG(mode)):
            raise InvalidArgument(f"{path}: not a regular file or a block device")
    except BaseException:
        img.close()
        raise
    return img


def _load_bat(img: Image) -> None:
    """The BAT as it is now (a backend may add entries meanwhile: only past the
    blocks there now, so the free room before the first block stays free);
    the file's size read after it, so every entry read lies inside."""
    header = img.header_or_fail()
    live = min(header.max_table_entries,
               fmt.blocks_for(img.footer.current_size, header.block_size))
    img.bat = fmt.Bat.from_bytes(img._pread(4 * live, header.table_offset, "the BAT"), live)
    img._size = storage_size(img.fd)
    if img.in_device:  # where the image ends now (a backend may have appended)
        img._end = device_tail(lambda n, at: img._pread(n, at, "metadata"), img._size, img.path)


def _load_head(img: Image) -> None:
    """Footer and header of ``img`` (no BAT): the tail footer, or its copy at 0."""
    img._size = storage_size(img.fd)
    if img._size < fmt.FOOTER_SIZE:
        raise Corrupt(f"{img.path}: file of {img._size} bytes is too small for a VHD footer")
    if img.in_device:
        img._end = device_tail(lambda n, at: img._pread(n, at, "metadata"), img._size, img.path)
    tail_error: Corrupt | None = None
    try:
        tail = fmt.Footer.from_bytes(img._pread(fmt.FOOTER_SIZE, img.end(), "the footer"),
                                     f"{img.path}: footer")
    except Corrupt as exc:
        tail, tail_error = None, exc
    head = None
    if tail is None or tail.disk_type != fmt.DISK_FIXED:
        try:
            head = fmt.Footer.from_bytes(img._pread(fmt.FOOTER_SIZE, 0, "the footer copy"),
                                         f"{img.path}: footer copy")
        except Corrupt:
            head = None
    if tail is not None and (head is None or head.uuid == tail.uuid):
        img.footer = tail
    elif head is not None and head.disk_type != fmt.DISK_FIXED:
        img.footer = head      # the tail is being moved by a writer appending blocks
    else:
        assert tail_error is not None or tail is not None
        raise tail_error or Corrupt(f"{img.path}: footer and footer copy disagree")
    img.header = None
    if img.footer.disk_type == fmt.DISK_FIXED:
        return
    hoff = img.footer.data_offset
    if hoff < fmt.FOOTER_SIZE or hoff + fmt.HEADER_SIZE > img._size:
        raise Corrupt(f"{img.path}: dynamic header offset {hoff} outside the file")
    header = fmt.Header.from_bytes(img._pread(fmt.HEADER_SIZE, hoff, "the dynamic header"),
                                   f"{img.path}: dynamic header")
    header.validate(f"{img.path}: dynamic header")
    img.header = header
