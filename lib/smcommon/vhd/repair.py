"""Repairing an image: its footers and blktap's batmap.

``repair`` restores a damaged head or tail footer from the other copy, then
rebuilds a batmap that libvhd would refuse (missing, destroyed, a checksum
that does not match, a bit set for a block that is not fully allocated):
blocks lying where the batmap must be (a writer that does not keep the
batmap, such as qemu, puts its first block right after the BAT) are moved to
the end first, then the batmap is written again from the sector bitmaps.
Every step is crash-safe (see ``smcommon.vhd.relayout``); repair run again
finishes the job.
"""

from __future__ import annotations

import os

from smcommon.vhd import batmap as bmap
from smcommon.vhd import format as fmt
from smcommon.vhd import layout, relayout
from smcommon.vhd.check import _end, _footers, _open_fd, _read
from smcommon.vhd.errors import Corrupt, from_os_error
from smcommon.vhd.image import Image, tail_offset


def repair(path: str | os.PathLike[str]) -> list[str]:
    """Restore damaged footers and the batmap; return what was done."""
    path = os.fspath(path)
    fd, size, in_device = _open_fd(path, writable=True)
    try:
        done = _repair_footers(fd, size, path, in_device)
    except OSError as exc:
        raise from_os_error(path, exc, "repairing") from None
    finally:
        os.close(fd)
    return done + _repair_batmap(path)


def _repair_batmap(path: str) -> list[str]:
    with Image.open(path, writable=True, parents=False) as img:
        if img.is_fixed or bmap.expected(img.footer) is False:
            return []
        if img.batmap_problem is None:
            if img.batmap is None:
                return []                       # tap 1.1 without a batmap: none needed
            wrong = [b for b in img.batmap.blocks() if b < len(img.bat or [])
                     and b not in set(relayout.full_blocks(img))]
            if not wrong:
                return []
            why = f"the batmap marked block(s) {wrong[:8]} full, their bitmaps are not"
        else:
            why = img.batmap_problem
        img.repairing = True
        try:
            return [f"batmap: {why}", *relayout.rebuild_batmap(img)]
        finally:
            img.repairing = False


def _repair_footers(fd: int, size: int, path: str, in_device: bool = False) -> list[str]:
    if size < fmt.FOOTER_SIZE:
        raise Corrupt(f"{path}: file of {size} bytes is too small to be repaired")
    tail, head = _footers(fd, _end(fd, size, path, in_device), path)
    if isinstance(tail, fmt.Footer):
        if tail.disk_type == fmt.DISK_FIXED:
            return []
        if isinstance(head, fmt.Footer) and head.to_bytes() == tail.to_bytes():
            return []
        os.pwrite(fd, tail.to_bytes(), 0)
        os.fsync(fd)
        why = "damaged" if isinstance(head, str) else "different"
        return [f"restored the footer copy at offset 0 from the tail footer (it was {why})"]
    if isinstance(head, str):
        raise Corrupt(f"{path}: both footers are damaged ({tail}; {head}); cannot repair")
    if head.disk_type == fmt.DISK_FIXED:
        raise Corrupt(f"{path}: {tail}; a fixed disk has no footer copy to repair from")
    pos = _data_end(fd, size, head, path)
    if not in_device:  # a device's image ends with its last structure
        pos = max(tail_offset(size), pos)
    os.pwrite(fd, head.to_bytes(), pos)
    os.fsync(fd)
    return [f"restored the tail footer at offset {pos} from the copy at offset 0"]


def _data_end(fd: int, size: int, footer: fmt.Footer, path: str) -> int:
    """Where the last metadata or data block ends (the earliest place for a tail footer)."""
    try:
        header = fmt.Header.from_bytes(_read(fd, fmt.HEADER_SIZE, footer.data_offset, path))
        header.validate()
    except Corrupt as exc:
        raise Corrupt(f"{path}: cannot place the tail footer: {exc}") from None
    bat_end = header.table_offset + fmt.bat_bytes(header.max_table_entries)
    if bat_end > size + fmt.BLOCK_SIZE * 4:
        raise Corrupt(f"{path}: BAT lies outside the file; cannot place the tail footer")
    live = min(header.max_table_entries, fmt.blocks_for(footer.current_size, header.block_size))
    raw = _read(fd, 4 * live, header.table_offset, path)
    bat = fmt.Bat.from_bytes(raw + b"\xff" * (4 * live - len(raw)), live)
    span = header.bitmap_size + header.block_size
    ends = [bat[b] * fmt.SECTOR + span for b in bat.allocated()]
    meta = layout.end_of_headers(layout.metadata_regions(footer.data_offset, header))
    if bmap.expected(footer) is not False:
        start, length = relayout.canonical_region(header)
        meta = max(meta, start + length)
    return max([meta, *ends])
