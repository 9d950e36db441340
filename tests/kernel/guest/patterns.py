"""The data the kernel tier writes, computed the same way in the guest and
on the host: ``pattern(tag, n)`` is n bytes determined by tag."""

from __future__ import annotations

import hashlib
from collections.abc import Callable


def pattern(tag: str, n: int) -> bytes:
    return hashlib.shake_256(tag.encode()).digest(n)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


KiB = 1024
MiB = 1024 * KiB
VDI_SIZE = 64 * MiB
# (offset, length, tag): what the scenarios write before a snapshot ...
BASE_WRITES = [
    (0, 4 * KiB, "base-0"),
    (3 * MiB // 2, MiB, "base-1"),
    (63 * MiB, MiB, "base-2"),
]
# ... and into the leaf after it (overlapping base-1, and a new block)
LEAF_WRITES = [(2 * MiB, 256 * KiB, "leaf-0"), (32 * MiB, 64 * KiB, "leaf-1")]
# what is read back: every write, the overlaps and some never-written space
CHECK_RANGES = [
    (0, 8 * KiB),
    (MiB, 2 * MiB),
    (32 * MiB - 4 * KiB, 72 * KiB),
    (62 * MiB, 2 * MiB),
]


def expected(writes: list[tuple[int, int, str]], offset: int, length: int) -> bytes:
    """What a disk holding ``writes`` (in order, over zeros) reads at offset."""
    buf = bytearray(length)
    for off, n, tag in writes:
        lo, hi = max(off, offset), min(off + n, offset + length)
        if lo < hi:
            data = pattern(tag, n)
            buf[lo - offset : hi - offset] = data[lo - off : hi - off]
    return bytes(buf)


def mismatches(
    read: Callable[[int, int], bytes], writes: list[tuple[int, int, str]]
) -> list[str]:
    """The CHECK_RANGES whose content differs from ``writes``."""
    bad = []
    for off, n in CHECK_RANGES:
        got = read(off, n)
        want = expected(writes, off, n)
        if got != want:
            first = next(i for i in range(n) if got[i : i + 1] != want[i : i + 1])
            bad.append(f"[{off}, +{n}): differs from byte {off + first} on")
    return bad
