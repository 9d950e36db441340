"""Checking an image against every structural rule, and repairing its footers.

``check`` parses the file tolerantly (it never trusts a size before bounding
it) and returns the list of problems found, one line each; ``[]`` means the
image is sound.  Unreferenced space between blocks (left by a writer killed
mid-allocation) is not a problem.  ``repair`` restores a damaged head or tail
footer from the other copy.
"""

from __future__ import annotations

import os
import stat

from smcommon.vhd import format as fmt
from smcommon.vhd.errors import Corrupt, InvalidArgument, VhdError, from_os_error
from smcommon.vhd.image import Image, first_block_problem, tail_offset
from smcommon.vhd.info import format_uuid
from smcommon.vhd.locks import lock_file

MAX_REPORTED = 50


def _read(fd: int, length: int, pos: int, path: str) -> bytes:
    try:
        return os.pread(fd, length, pos)
    except OSError as exc:
        raise from_os_error(path, exc, "reading") from None


def _footers(fd: int, size: int, path: str) -> tuple[fmt.Footer | str, fmt.Footer | str]:
    """The tail footer and the copy at offset 0, each parsed or the reason it is bad."""
    def parse(pos: int, where: str) -> fmt.Footer | str:
        try:
            return fmt.Footer.from_bytes(_read(fd, fmt.FOOTER_SIZE, pos, path), where)
        except Corrupt as exc:
            return str(exc)
    return parse(tail_offset(size), "tail footer"), parse(0, "footer copy at offset 0")


def _open_fd(path: str, writable: bool) -> tuple[int, int]:
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise from_os_error(path, exc, "opening the image") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{path}: not a regular file")
        lock_file(fd, path, exclusive=writable)
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def check(path: str | os.PathLike[str], *, search_dirs: list[str] | None = None) -> list[str]:
    """Every structural problem of the image (and its link to its parent); [] = sound."""
    path = os.fspath(path)
    fd, size = _open_fd(path, writable=False)
    try:
        problems = _check(fd, size, path, search_dirs)
    finally:
        os.close(fd)
    if len(problems) > MAX_REPORTED:
        problems = problems[:MAX_REPORTED] + [f"... and {len(problems) - MAX_REPORTED} more"]
    return problems


def _check(fd: int, size: int, path: str, search_dirs: list[str] | None) -> list[str]:
    if size < fmt.FOOTER_SIZE:
        raise Corrupt(f"{path}: file of {size} bytes is too small to be a VHD image")
    problems: list[str] = []
    tail, head = _footers(fd, size, path)
    footer = tail if isinstance(tail, fmt.Footer) else None
    if footer is None:
        problems.append(str(tail))
    if footer is not None and footer.disk_type == fmt.DISK_FIXED:
        if footer.current_size % fmt.SECTOR:
            problems.append(f"disk size {footer.current_size} is not a multiple of 512")
        if footer.current_size != tail_offset(size):
            problems.append(f"fixed disk of {footer.current_size} bytes in a file of "
                            f"{size} bytes (expected {footer.current_size + fmt.FOOTER_SIZE})")
        return problems
    if isinstance(head, str):
        problems.append(head)
        if footer is None:
            return problems
    elif footer is None:
        footer = head
    elif (head.uuid, head.disk_type, head.data_offset) != (
            footer.uuid, footer.disk_type, footer.data_offset):
        # a stale copy of the same image (a metadata update killed between the two
        # footer writes: the tail is written first and wins) is not a problem;
        # repair or the next write syncs it
        problems.append("the footer copy at offset 0 is not a copy of the tail footer "
                        "(another UUID, disk type or header offset)")
    assert footer is not None
    if footer.features & ~0x3:
        problems.append(f"footer features {footer.features:#010x} has unknown bits")
    if not footer.features & fmt.FEATURES_RESERVED:
        problems.append("footer features: the reserved bit 0x2 is not set")
    if footer.current_size % fmt.SECTOR:
        problems.append(f"disk size {footer.current_size} is not a multiple of 512")
    end = tail_offset(size)
    hoff = footer.data_offset
    if hoff < fmt.FOOTER_SIZE or hoff + fmt.HEADER_SIZE > end:
        return [*problems, f"dynamic header offset {hoff} outside the file"]
    try:
        header = fmt.Header.from_bytes(_read(fd, fmt.HEADER_SIZE, hoff, path))
        header.validate()
    except Corrupt as exc:
        return [*problems, str(exc)]
    bat_len = fmt.bat_bytes(header.max_table_entries)
    regions = [("footer copy", 0, fmt.FOOTER_SIZE), ("dynamic header", hoff, fmt.HEADER_SIZE),
               ("BAT", header.table_offset, bat_len)]
    if header.table_offset < hoff + fmt.HEADER_SIZE and header.table_offset + bat_len > hoff:
        problems.append(f"BAT at {header.table_offset} overlaps the dynamic header")
    if header.table_offset < fmt.FOOTER_SIZE or header.table_offset + 4 * header.max_table_entries > end:
        return [*problems, (f"BAT ({header.max_table_entries} entries at {header.table_offset}) "
                           "lies outside the file")]
    if header.max_table_entries * header.block_size < footer.current_size:
        problems.append(f"BAT of {header.max_table_entries} blocks of {header.block_size} "
                        f"cannot map the disk size {footer.current_size}")
    for i, loc in enumerate(header.locators):
        if not loc.used:
            continue
        if loc.code not in fmt.LOCATOR_CODES:
            problems.append(f"parent locator {i}: unknown platform code {loc.code!r}")
        if loc.data_length > fmt.MAX_LOCATOR_DATA or loc.data_offset + loc.data_length > end:
            problems.append(f"parent locator {i} ({loc.code!r}): data ({loc.data_length} "
                            f"bytes at {loc.data_offset}) outside the file")
            continue
        regions.append((f"parent locator {i}", loc.data_offset, max(loc.data_length, 1)))
    for i, (n1, s1, l1) in enumerate(regions):
        for n2, s2, l2 in regions[i + 1 :]:
            if s1 < s2 + l2 and s2 < s1 + l1:
                problems.append(f"{n1} (at {s1}) overlaps {n2} (at {s2})")
    bat = fmt.Bat.from_bytes(_read(fd, 4 * header.max_table_entries, header.table_offset, path),
                             header.max_table_entries)
    problems.extend(_check_blocks(bat, header, regions, end))
    if footer.disk_type == fmt.DISK_DIFFERENCING:
        problems.extend(_check_parent(path, header, search_dirs))
    return problems


def _check_blocks(bat: fmt.Bat, header: fmt.Header, regions: list[tuple[str, int, int]],
                  end: int) -> list[str]:
    problems: list[str] = []
    span = header.bitmap_size + header.block_size
    if first_block_problem(bat, span, end, [(s, n) for _, s, n in regions]) is None:
        return problems                 # sound: no loop per block needed
    blocks = sorted((bat[b] * fmt.SECTOR, b) for b in bat.allocated())
    prev: tuple[int, int] | None = None
    for pos, b in blocks:
        if pos + span > end:
            problems.append(f"BAT entry {b} (offset {pos}) points past the end of the image ({end})")
        for name, rstart, rlen in regions:
            if pos < rstart + rlen and rstart < pos + span:
                problems.append(f"BAT entry {b} (offset {pos}) overlaps the {name}")
        if prev is not None and pos < prev[0] + span:
            problems.append(f"BAT entries {prev[1]} and {b} overlap (offsets {prev[0]} and {pos})")
        prev = (pos, b)
    return problems


def _check_parent(path: str, header: fmt.Header, search_dirs: list[str] | None) -> list[str]:
    try:
        img = Image.open(path, parents=False)
    except VhdError:
        return []               # the child's own problems are reported already
    try:
        ppath = img.find_parent(search_dirs)
        st = os.fstat(img.fd)
        with Image.open(ppath, search_dirs=search_dirs, _seen={(st.st_dev, st.st_ino)},
                        _depth=2) as parent:
            if parent.footer.uuid != header.parent_uuid:
                return [(f"parent {ppath} has UUID {format_uuid(parent.footer.uuid)}, expected "
                        f"{format_uuid(header.parent_uuid)}")]
            if not parent.is_fixed and parent.block_size != header.block_size:
                return [(f"parent {ppath} has block size {parent.block_size}, the child "
                        f"{header.block_size}")]
            if parent.footer.timestamp != header.parent_timestamp:
                return [(f"parent timestamp {header.parent_timestamp} differs from the "
                        f"parent's footer timestamp {parent.footer.timestamp} ({ppath})")]
    except VhdError as exc:
        return [f"parent: {exc}"]
    finally:
        img.close()
    return []


def repair(path: str | os.PathLike[str]) -> list[str]:
    """Restore a damaged head or tail footer from the other copy; return what was done."""
    path = os.fspath(path)
    fd, size = _open_fd(path, writable=True)
    try:
        return _repair(fd, size, path)
    except OSError as exc:
        raise from_os_error(path, exc, "repairing") from None
    finally:
        os.close(fd)


def _repair(fd: int, size: int, path: str) -> list[str]:
    if size < fmt.FOOTER_SIZE:
        raise Corrupt(f"{path}: file of {size} bytes is too small to be repaired")
    tail, head = _footers(fd, size, path)
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
    pos = max(tail_offset(size), _data_end(fd, size, head, path))
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
    raw = _read(fd, 4 * header.max_table_entries, header.table_offset, path)
    bat = fmt.Bat.from_bytes(raw + b"\xff" * (4 * header.max_table_entries - len(raw)),
                             header.max_table_entries)
    span = header.bitmap_size + header.block_size
    ends = [bat[b] * fmt.SECTOR + span for b in bat.allocated()]
    return max([bat_end, footer.data_offset + fmt.HEADER_SIZE, *ends])
