"""Helpers for the integration tests that prove ``smcommon.vhd`` against real tools.

This module owns everything the VHD proof tests share and that is independent of
the library under test: an independent reader/writer of the on-disk VHD structures
(footer, dynamic header, BAT, parent locators) used to inspect and to corrupt
images on purpose, wrappers for ``qemu-img`` / ``qemu-io`` and libvhdi (``pyvhdi``),
deterministic data generation, and a way to run the ``vhd`` command.

The structures follow the Microsoft VHD specification (v1.0): a 512-byte footer at
the end of every image (and a copy at offset 0 of dynamic/differencing images), a
1024-byte dynamic header at ``footer.data_offset``, a BAT of big-endian u32 sector
numbers at ``header.table_offset``, and 8 parent locator entries in the header.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTOR = 512
MIB = 1024 * 1024
BLOCK = 2 * MIB
UNUSED = 0xFFFFFFFF

# Footer: cookie, features, version, data_offset, timestamp, creator_app,
# creator_version, creator_os, original_size, current_size, geometry,
# disk_type, checksum, uuid, saved_state, hidden (blktap), reserved.
FOOTER = struct.Struct(">8sIIQI4sI4sQQIII16sBB426s")
# Dynamic header: cookie, data_offset, table_offset, header_version,
# max_table_entries, block_size, checksum, parent_uuid, parent_timestamp,
# reserved, parent_unicode_name (UTF-16BE), 8 locators (192 bytes), reserved.
HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
# Parent locator entry: platform_code, data_space, data_length, reserved, data_offset.
LOCATOR = struct.Struct(">4sIIIQ")
assert FOOTER.size == 512 and HEADER.size == 1024 and LOCATOR.size == 24

FOOTER_FIELDS = [
    "cookie",
    "features",
    "version",
    "data_offset",
    "timestamp",
    "creator_app",
    "creator_version",
    "creator_os",
    "original_size",
    "current_size",
    "geometry",
    "disk_type",
    "checksum",
    "uuid",
    "saved_state",
    "hidden",
    "reserved",
]
HEADER_FIELDS = [
    "cookie",
    "data_offset",
    "table_offset",
    "header_version",
    "max_table_entries",
    "block_size",
    "checksum",
    "parent_uuid",
    "parent_timestamp",
    "reserved1",
    "parent_name",
    "locators",
    "reserved2",
]
# Offsets of the fields the fuzz tests aim at.
FOOTER_CHECKSUM_AT = 64
HEADER_CHECKSUM_AT = 36

DISK_FIXED, DISK_DYNAMIC, DISK_DIFF = 2, 3, 4


def vhd_checksum(buf: bytes, at: int) -> int:
    """One's complement of the byte sum, with the checksum field taken as zero."""
    total = sum(buf) - sum(buf[at : at + 4])
    return (~total) & 0xFFFFFFFF


@dataclass
class Layout:
    """Where the structures of one image are, read independently of the library."""

    size: int
    footer: dict[str, object]
    footer_at: int
    header: dict[str, object] | None
    header_at: int | None
    bat: list[int]
    locators: list[dict[str, Any]]


def read_footer(buf: bytes) -> dict[str, object]:
    return dict(zip(FOOTER_FIELDS, FOOTER.unpack(buf), strict=True))


def read_header(buf: bytes) -> dict[str, object]:
    return dict(zip(HEADER_FIELDS, HEADER.unpack(buf), strict=True))


def layout(path: str | Path) -> Layout:
    """Parse an image's footer, header, BAT and locators (trusting nothing but the spec)."""
    data = Path(path).read_bytes()
    size = len(data)
    footer_at = size - SECTOR
    footer = read_footer(data[footer_at:])
    header = None
    header_at = None
    bat: list[int] = []
    locators: list[dict[str, Any]] = []
    if footer["disk_type"] in (DISK_DYNAMIC, DISK_DIFF):
        header_at = int(footer["data_offset"])  # type: ignore[call-overload]
        header = read_header(data[header_at : header_at + 1024])
        table = int(header["table_offset"])  # type: ignore[call-overload]
        n = int(header["max_table_entries"])  # type: ignore[call-overload]
        bat = list(struct.unpack(f">{n}I", data[table : table + 4 * n]))
        raw = header["locators"]
        assert isinstance(raw, bytes)
        for i in range(8):
            code, space, length, _res, off = LOCATOR.unpack_from(raw, i * LOCATOR.size)
            locators.append(
                {
                    "index": i,
                    "code": code,
                    "space": space,
                    "length": length,
                    "offset": off,
                }
            )
    return Layout(size, footer, footer_at, header, header_at, bat, locators)


def patch(path: str | Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fix_footer_checksum(path: str | Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        buf = f.read(SECTOR)
        f.seek(at + FOOTER_CHECKSUM_AT)
        f.write(struct.pack(">I", vhd_checksum(buf, FOOTER_CHECKSUM_AT)))


def fix_header_checksum(path: str | Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        buf = f.read(1024)
        f.seek(at + HEADER_CHECKSUM_AT)
        f.write(struct.pack(">I", vhd_checksum(buf, HEADER_CHECKSUM_AT)))


def set_footer_field(
    path: str | Path, field: str, fmt: str, value: int | bytes
) -> None:
    """Set one footer field in both copies (end, and offset 0 when dynamic) and re-checksum."""
    lay = layout(path)
    off = _field_offset(FOOTER, FOOTER_FIELDS, field)
    for at in _footer_copies(path, lay):
        patch(path, at + off, struct.pack(">" + fmt, value))
        fix_footer_checksum(path, at)


def set_header_field(
    path: str | Path, field: str, fmt: str, value: int | bytes
) -> None:
    lay = layout(path)
    assert lay.header_at is not None
    patch(
        path,
        lay.header_at + _field_offset(HEADER, HEADER_FIELDS, field),
        struct.pack(">" + fmt, value),
    )
    fix_header_checksum(path, lay.header_at)


def set_bat_entry(path: str | Path, index: int, value: int) -> None:
    lay = layout(path)
    assert lay.header is not None
    table = int(lay.header["table_offset"])  # type: ignore[call-overload]
    patch(path, table + 4 * index, struct.pack(">I", value))


def _footer_copies(path: str | Path, lay: Layout) -> list[int]:
    copies = [lay.footer_at]
    if lay.footer["disk_type"] in (DISK_DYNAMIC, DISK_DIFF):
        with open(path, "rb") as f:
            if f.read(8) == b"conectix":
                copies.append(0)
    return copies


def _field_offset(st: struct.Struct, names: list[str], field: str) -> int:
    fmt = st.format.lstrip(">")
    codes: list[str] = []
    num = ""
    for ch in fmt:
        if ch.isdigit():
            num += ch
        else:
            codes.append(num + ch)
            num = ""
    idx = names.index(field)
    return struct.calcsize(">" + "".join(codes[:idx]))


def relink_by_hand(
    child: str | Path, parent_path: str, parent_uuid: bytes | None = None
) -> None:
    """Point ``child``'s parent name and every locator at ``parent_path`` (a string
    written as is), keeping each locator's encoding; re-checksum the header.
    This is how the fuzz tests forge locators the library would never write."""
    lay = layout(child)
    assert lay.header is not None and lay.header_at is not None
    name_off = _field_offset(HEADER, HEADER_FIELDS, "parent_name")
    base = os.path.basename(parent_path).encode("utf-16-be")[:512].ljust(512, b"\0")
    patch(child, lay.header_at + name_off, base)
    loc_off = _field_offset(HEADER, HEADER_FIELDS, "locators")
    for loc in lay.locators:
        code = loc["code"]
        if code == b"\0\0\0\0":
            continue
        if code in (b"W2ru", b"W2ku"):
            payload = parent_path.replace("/", "\\").encode("utf-16-le")
        elif code == b"MacX":
            payload = ("file://" + parent_path).encode("utf-8")
        else:
            payload = parent_path.encode("utf-8")
        space = int(loc["space"])  # type: ignore[call-overload]
        # The spec says data_space counts sectors; some writers store bytes.
        room = space * SECTOR if space < SECTOR else space
        assert len(payload) <= room, (
            f"locator {loc['index']} has no room for {parent_path!r}"
        )
        patch(child, int(loc["offset"]), payload.ljust(room, b"\0"))  # type: ignore[call-overload]
        entry_at = lay.header_at + loc_off + int(loc["index"]) * LOCATOR.size  # type: ignore[call-overload]
        patch(child, entry_at + 8, struct.pack(">I", len(payload)))
    if parent_uuid is not None:
        patch(
            child,
            lay.header_at + _field_offset(HEADER, HEADER_FIELDS, "parent_uuid"),
            parent_uuid,
        )
    fix_header_checksum(child, lay.header_at)


# --- data --------------------------------------------------------------------


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, incompressible bytes for one write (never all zero)."""
    data = random.Random(seed).randbytes(length)
    if length and not any(data):
        data = b"\x01" + data[1:]
    return data


def random_writes(
    rng: random.Random, size: int, count: int, *, align: int = 1, max_len: int = 3 * MIB
) -> list[tuple[int, int, int]]:
    """(offset, length, seed) triples: small, sector-sized, unaligned and block-straddling."""
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            length = rng.randint(1, 700)
        elif kind < 0.6:
            length = rng.randint(1, 64) * SECTOR + rng.choice((0, rng.randint(1, 511)))
        else:
            length = rng.randint(4096, max_len)
        if kind > 0.85:  # straddle a block boundary on purpose
            b = rng.randrange(1, max(2, size // BLOCK))
            off = b * BLOCK - rng.randint(1, min(length, BLOCK))
        else:
            off = rng.randrange(0, size)
        length = max(align, (length // align) * align)
        off = (off // align) * align
        off = max(0, min(off, size - length))
        out.append((off, length, rng.getrandbits(32)))
    return out


def apply(model: bytearray, off: int, data: bytes) -> None:
    model[off : off + len(data)] = data


# --- outside tools -------------------------------------------------------------


def tool(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )


def qemu_info(path: str | Path) -> dict[str, object]:
    res = tool(["qemu-img", "info", "-f", "vpc", "--output", "json", str(path)])
    assert res.returncode == 0, f"qemu-img info failed on {path}: {res.stderr}"
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def qemu_compare_raw(vhd: str | Path, raw: str | Path) -> tuple[bool, str]:
    """qemu-img compare: same content; sizes must match too (checked here, since
    plain compare forgives a longer image whose tail is zero and strict mode (-s)
    also compares allocation, which is not content)."""
    vsize = int(qemu_info(vhd)["virtual-size"])  # type: ignore[call-overload]
    rsize = os.path.getsize(raw)
    if vsize != rsize:
        return False, f"qemu sees {vsize} bytes, the raw file has {rsize}"
    res = tool(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(vhd), str(raw)])
    return res.returncode == 0, (res.stdout + res.stderr).strip()


def qemu_to_raw(vhd: str | Path, raw: str | Path) -> None:
    res = tool(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(raw)])
    assert res.returncode == 0, res.stderr


def qemu_io_write(vhd: str | Path, off: int, length: int, byte: int) -> None:
    res = tool(
        ["qemu-io", "-f", "vpc", "-c", f"write -P {byte:#x} {off} {length}", str(vhd)]
    )
    assert res.returncode == 0 and "error" not in res.stdout.lower(), (
        res.stdout + res.stderr
    )


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def libvhdi_read_chain(paths: list[str], offset: int, length: int) -> bytes:
    """Read through libvhdi: ``paths`` leaf first; each child is linked to its parent."""
    import pyvhdi  # type: ignore[import-not-found]

    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    try:
        return bytes(files[0].read_buffer_at_offset(length, offset))
    finally:
        for f in files:
            f.close()


# --- the vhd command ------------------------------------------------------------


def vhd_cmd() -> list[str]:
    """The ``vhd`` console script of the interpreter running the tests, else its entry point."""
    script = Path(sys.executable).parent / "vhd"
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from smcommon.vhd.cli import main; sys.exit(main())",
    ]


def run_vhd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return tool([*vhd_cmd(), *args], timeout=timeout)


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to
