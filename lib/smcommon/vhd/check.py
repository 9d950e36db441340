"""Checking an image against every structural rule libvhd (blktap) applies.

``check`` parses the file tolerantly (it never trusts a size before bounding
it) and returns the list of problems found, one line each; ``[]`` means the
image is sound: libvhd (tapdisk) opens it and ``vhd-util check`` accepts it,
with two deliberate differences: a footer copy that is a stale copy of the
same image (an update killed between the two footer writes; libvhd opens
from the tail) is not a problem, and neither is a parent timestamp that
differs from the parent's (libvhd records the parent file's mtime and never
compares it).  The rules, beyond the format's checksums and bounds:

- footer: format version 1.0, no unknown feature, reserved bytes zero, a
  UUID, no creation time in the future, a ``tap`` creator no newer than
  1.3, geometry no larger than the size allows;
- dynamic header: reserved fields zero; a dynamic disk has no parent fields;
- BAT: only the entries that map the disk count; no block starts before
  the end of the metadata (libvhd's ``end_of_headers``) or runs past the
  footer, no two overlap;
- batmap (``tap`` 1.2 or later): header at the end of the BAT with cookie,
  version, size, offset and checksum as libvhd validates them, and a bit
  set only for an allocated block whose sector bitmap is all ones;
- parent locators: data_space read by libvhd's rule, data inside its space
  and the file, no duplicate platform code, each W2RU/W2KU/MACX naming the
  header's parent name and an existing file; the parent's UUID matches.

Unreferenced space between blocks (left by a writer killed mid-allocation)
is not a problem.  ``smcommon.vhd.repair`` fixes footers and the batmap.
"""

from __future__ import annotations

import os
import stat

from smcommon.vhd import batmap as bmap
from smcommon.vhd import format as fmt
from smcommon.vhd import layout
from smcommon.vhd.errors import Corrupt, InvalidArgument, VhdError, from_os_error
from smcommon.vhd.image import Image, device_tail, node_key, storage_size, tail_offset
from smcommon.vhd.info import format_uuid
from smcommon.vhd.locks import lock_file
from smcommon.vhd.parents import image_place, is_image_node, resolve

MAX_REPORTED = 50
TIMESTAMP_SLACK = 1800          # libvhd allows this much clock skew (seconds)
TAP_MAX_VERSION = 0x00010003


def _read(fd: int, length: int, pos: int, path: str) -> bytes:
    try:
        return os.pread(fd, length, pos)
    except OSError as exc:
        raise from_os_error(path, exc, "reading") from None


def _footers(fd: int, end: int, path: str) -> tuple[fmt.Footer | str, fmt.Footer | str]:
    """The tail footer (at ``end``) and the copy at offset 0, each parsed or the
    reason it is bad."""
    def parse(pos: int, where: str) -> fmt.Footer | str:
        try:
            return fmt.Footer.from_bytes(_read(fd, fmt.FOOTER_SIZE, pos, path), where)
        except Corrupt as exc:
            return str(exc)
    return parse(end, "tail footer"), parse(0, "footer copy at offset 0")


def _open_fd(path: str, writable: bool) -> tuple[int, int, bool]:
    """fd (locked), size, and whether the image is in a block device."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise from_os_error(path, exc, "opening the image") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise InvalidArgument(f"{path}: not a regular file or a block device")
        lock_file(fd, path, exclusive=writable)
        return fd, storage_size(fd), stat.S_ISBLK(mode)
    except BaseException:
        os.close(fd)
        raise


def _end(fd: int, size: int, path: str, in_device: bool) -> int:
    """Where the tail footer should be: a file's last sector; in a device, after
    the image's last structure (``device_tail``)."""
    if not in_device:
        return tail_offset(size)
    try:
        return device_tail(lambda n, at: _read(fd, n, at, path), size, path)
    except Corrupt:
        return tail_offset(size)


def check(path: str | os.PathLike[str], *, search_dirs: list[str] | None = None) -> list[str]:
    """Every structural problem of the image (and its link to its parent); [] = sound."""
    path = os.fspath(path)
    fd, size, in_device = _open_fd(path, writable=False)
    try:
        problems = _check(fd, size, path, search_dirs, in_device)
    finally:
        os.close(fd)
    if len(problems) > MAX_REPORTED:
        problems = problems[:MAX_REPORTED] + [f"... and {len(problems) - MAX_REPORTED} more"]
    return problems


def footer_rules(footer: fmt.Footer) -> list[str]:
    """What libvhd refuses in a footer whose cookie and checksum are right."""
    out: list[str] = []
    if footer.version != fmt.FORMAT_VERSION:
        out.append(f"footer: file format version {footer.version >> 16}."
                   f"{footer.version & 0xFFFF} (libvhd knows only 1.0)")
    if footer.features & ~0x3:
        out.append(f"footer features {footer.features:#010x} has unknown bits")
    if not footer.features & fmt.FEATURES_RESERVED:
        out.append("footer features: the reserved bit 0x2 is not set")
    if footer.current_size % fmt.SECTOR:
        out.append(f"disk size {footer.current_size} is not a multiple of 512")
    if footer.timestamp > fmt.vhd_now() + TIMESTAMP_SLACK:
        out.append(f"footer: creation time {footer.timestamp} lies in the future")
    if footer.creator_app[:3] == b"tap" and footer.creator_version > TAP_MAX_VERSION:
        out.append(f"footer: tap creator version {footer.creator_version:#010x} is newer "
                   "than libvhd's 1.3")
    cyl, heads, spt = fmt.geometry(footer.current_size)
    if (footer.cylinders, footer.heads, footer.sectors) > (cyl, heads, spt):
        out.append(f"footer: geometry {footer.cylinders}/{footer.heads}/{footer.sectors} is "
                   f"larger than the disk size allows ({cyl}/{heads}/{spt})")
    if footer.saved_state not in (0, 1):
        out.append(f"footer: saved state {footer.saved_state} (must be 0 or 1)")
    if footer.hidden not in (0, 1):
        out.append(f"footer: hidden flag {footer.hidden} (must be 0 or 1)")
    if any(footer.reserved):
        out.append("footer: reserved bytes are not zero")
    if not any(footer.uuid):
        out.append("footer: the UUID is null")
    return out


def header_rules(header: fmt.Header, footer: fmt.Footer) -> list[str]:
    out: list[str] = []
    if header.reserved1 or any(header.reserved2):
        out.append("dynamic header: reserved fields are not zero")
    if footer.disk_type == fmt.DISK_DIFFERENCING:
        if header.parent_timestamp > fmt.vhd_now() + TIMESTAMP_SLACK:
            out.append(f"parent timestamp {header.parent_timestamp} lies in the future")
        if not header.parent_name:
            out.append("dynamic header: no parent name")
    else:
        if any(header.parent_name_raw) or any(header.locators_raw) or \
                any(header.parent_uuid) or header.parent_timestamp:
            out.append(f"dynamic header: a {footer.type_name} disk has parent fields "
                       "(name, locators, UUID or timestamp) that are not zero")
    return out


def _check(fd: int, size: int, path: str, search_dirs: list[str] | None,
           in_device: bool = False) -> list[str]:
    if size < fmt.FOOTER_SIZE:
        raise Corrupt(f"{path}: file of {size} bytes is too small to be a VHD image")
    problems: list[str] = []
    end = _end(fd, size, path, in_device)
    tail, head = _footers(fd, end, path)
    footer = tail if isinstance(tail, fmt.Footer) else None
    if footer is not None and in_device and isinstance(head, fmt.Footer) and \
            head.uuid != footer.uuid:
        footer, tail = None, "the footer at the end of the image is not its own"
    if footer is None and not (in_device and isinstance(head, fmt.Footer)):
        # in a device a writer killed mid-allocation leaves no tail: the copy is
        # the footer then (the next writer puts the tail back)
        problems.append(str(tail))
    if footer is not None and footer.disk_type == fmt.DISK_FIXED:
        problems += [p for p in footer_rules(footer) if "multiple of 512" not in p]
        if footer.current_size % fmt.SECTOR:
            problems.append(f"disk size {footer.current_size} is not a multiple of 512")
        if footer.current_size != end:
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
    problems += footer_rules(footer)
    hoff = footer.data_offset
    if hoff < fmt.FOOTER_SIZE or hoff + fmt.HEADER_SIZE > end:
        return [*problems, f"dynamic header offset {hoff} outside the file"]
    try:
        header = fmt.Header.from_bytes(_read(fd, fmt.HEADER_SIZE, hoff, path))
        header.validate()
    except Corrupt as exc:
        return [*problems, str(exc)]
    problems += header_rules(header, footer)
    bat_len = fmt.bat_bytes(header.max_table_entries)
    if header.table_offset < hoff + fmt.HEADER_SIZE and header.table_offset + bat_len > hoff:
        problems.append(f"BAT at {header.table_offset} overlaps the dynamic header")
    if header.table_offset < fmt.FOOTER_SIZE or header.table_offset + 4 * header.max_table_entries > end:
        return [*problems, (f"BAT ({header.max_table_entries} entries at {header.table_offset}) "
                           "lies outside the file")]
    if header.max_table_entries * header.block_size < footer.current_size:
        problems.append(f"BAT of {header.max_table_entries} blocks of {header.block_size} "
                        f"cannot map the disk size {footer.current_size}")
    live = min(header.max_table_entries, fmt.blocks_for(footer.current_size, header.block_size))
    bat = fmt.Bat.from_bytes(_read(fd, 4 * live, header.table_offset, path), live)
    found, batmap_problems = bmap.read(lambda n, at: _read(fd, n, at, path), footer, header, end)
    regions = layout.metadata_regions(hoff, header, found.header if found else None)
    for i, (n1, s1, l1) in enumerate(regions):
        for n2, s2, l2 in regions[i + 1 :]:
            if layout.overlaps(s1, l1, s2, l2):
                problems.append(f"{n1} (at {s1}) overlaps {n2} (at {s2})")
    problems += _check_locators(fd, path, footer, header, end)
    problems += _check_blocks(bat, header, regions, end)
    if batmap_problems:
        problems += _foreign_writer(batmap_problems, bat, header)
    elif found is not None:
        problems += _check_bits(fd, path, found, bat, header)
    if footer.disk_type == fmt.DISK_DIFFERENCING:
        problems.extend(_check_parent(path, header, search_dirs))
    return problems


def _foreign_writer(problems: list[str], bat: fmt.Bat, header: fmt.Header) -> list[str]:
    """The batmap problems, naming the data block that lies where the batmap must
    be (a writer that does not keep blktap's batmap, such as qemu, put it there)."""
    at = fmt.batmap_header_offset(header.table_offset, header.max_table_entries)
    size = fmt.BATMAP_HEADER_SIZE + fmt.batmap_sectors(header.max_table_entries) * fmt.SECTOR
    span = header.bitmap_size + header.block_size
    over = [b for b in bat.allocated() if layout.overlaps(bat[b] * fmt.SECTOR, span, at, size)]
    if not over:
        return problems
    first = (f"{problems[0]}: data block {over[0]} (offset {bat[over[0]] * fmt.SECTOR}) "
             f"lies where the batmap must be (at {at}), put there by a writer that does not "
             "keep blktap's batmap (qemu?); repair moves the block and rebuilds the batmap")
    return [first, *problems[1:]]


def _check_bits(fd: int, path: str, found: bmap.Batmap, bat: fmt.Bat,
                header: fmt.Header) -> list[str]:
    """A set bit promises a fully allocated block (its sector bitmap all ones)."""
    out: list[str] = []
    full = b"\xff" * header.bitmap_size
    for b in found.blocks():
        if b >= len(bat):
            continue                    # past the disk: libvhd never reads it
        if bat[b] == fmt.UNALLOCATED:
            out.append(f"batmap marks unallocated block {b} full")
        elif _read(fd, header.bitmap_size, bat[b] * fmt.SECTOR, path) != full:
            out.append(f"batmap marks block {b} full, but its sector bitmap is not all ones")
    return out


def _check_locators(fd: int, path: str, footer: fmt.Footer, header: fmt.Header,
                    end: int) -> list[str]:
    out: list[str] = []
    seen: set[bytes] = set()
    raw = header.locators_raw
    child_dir = os.path.dirname(image_place(path))
    for i, loc in enumerate(header.locators):
        name = f"parent locator {i}"
        if not loc.used:
            if any(raw[i * 24 : i * 24 + 24]):
                out.append(f"{name}: unused (no platform code) but not zero")
            continue
        name += f" ({loc.code.decode('latin-1')})"
        if loc.code not in fmt.LOCATOR_CODES:
            out.append(f"{name}: unknown platform code {loc.code!r}")
            continue
        if loc.code in seen:
            out.append(f"{name}: a second locator with this platform code")
        seen.add(loc.code)
        space = loc.space
        if loc.data_offset == 0:
            out.append(f"{name}: data offset 0")
        if space is None:
            out.append(f"{name}: invalid data space {loc.data_space} (libvhd reads a value "
                       "below 512 as sectors, a multiple of 512 as bytes)")
        if loc.data_length == 0:
            out.append(f"{name}: data length 0")
        if space is not None and loc.data_length > space:
            out.append(f"{name}: {loc.data_length} bytes of data in a space of {space}")
        if loc.reserved:
            out.append(f"{name}: reserved field is not zero")
        extent = max(space or 0, loc.data_length)
        if loc.data_length > fmt.MAX_LOCATOR_DATA or loc.data_offset + extent > end:
            out.append(f"{name}: data ({loc.data_length} bytes, space {space} at "
                       f"{loc.data_offset}) outside the file")
            continue
        if footer.disk_type != fmt.DISK_DIFFERENCING or not loc.data_length or \
                loc.code not in (fmt.LOC_W2RU, fmt.LOC_W2KU, fmt.LOC_MACX):
            continue
        try:
            text = fmt.decode_locator(loc.code, _read(fd, loc.data_length, loc.data_offset, path))
        except Corrupt as exc:
            out.append(f"{name}: {exc}")
            continue
        label = loc.code.decode()
        full = resolve(child_dir, label, text)
        if os.path.basename(full) != header.parent_name:
            out.append(f"{name}: names {text!r}, not the header's parent name "
                       f"{header.parent_name!r}")
        elif not is_image_node(full):
            out.append(f"{name}: names {text!r}, which does not exist")
    return out


def _check_blocks(bat: fmt.Bat, header: fmt.Header, regions: list[layout.Region],
                  end: int) -> list[str]:
    problems: list[str] = []
    span = header.bitmap_size + header.block_size
    eoh = layout.end_of_headers(regions)
    offsets = bat.offsets()
    if not offsets or (offsets[0] * fmt.SECTOR >= eoh and layout.first_block_problem(
            bat, span, end, [(s, n) for _, s, n in regions]) is None):
        return problems                 # sound: no loop per block needed
    blocks = sorted((bat[b] * fmt.SECTOR, b) for b in bat.allocated())
    prev: tuple[int, int] | None = None
    for pos, b in blocks:
        if pos + span > end:
            problems.append(f"BAT entry {b} (offset {pos}) points past the end of the image ({end})")
        hit = [name for name, rstart, rlen in regions if layout.overlaps(pos, span, rstart, rlen)]
        for name in hit:
            problems.append(f"BAT entry {b} (offset {pos}) overlaps the {name}")
        if not hit and pos < eoh:
            problems.append(f"BAT entry {b} (offset {pos}) lies before the end of the "
                            f"metadata ({eoh}), where libvhd refuses data blocks")
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
        with Image.open(ppath, search_dirs=search_dirs, _seen={node_key(st)},
                        _depth=2) as parent:
            if parent.footer.uuid != header.parent_uuid:
                return [(f"parent {ppath} has UUID {format_uuid(parent.footer.uuid)}, expected "
                        f"{format_uuid(header.parent_uuid)}")]
            if not parent.is_fixed and parent.block_size != header.block_size:
                return [(f"parent {ppath} has block size {parent.block_size}, the child "
                        f"{header.block_size}")]
    except VhdError as exc:
        return [f"parent: {exc}"]
    finally:
        img.close()
    return []
