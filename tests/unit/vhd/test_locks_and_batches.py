"""Image locks (one writer, shared readers, bounded waits) and batched coalesce."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from smcommon import vhd
from smcommon.vhd import format as fmt
from smcommon.vhd import locks, ops
from smcommon.vhd.image import Image
from vhd_unit_helpers import BLOCK, MIB, apply, pattern


def test_a_writer_excludes_others_and_readers_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 4 * MIB)
    monkeypatch.setattr(locks, "LOCK_TIMEOUT", 0.05)
    with Image.open(p, writable=True):
        with pytest.raises(vhd.Busy, match="in use by another process"):
            vhd.info(p)
        with pytest.raises(vhd.Busy):
            vhd.write(p, 0, b"x")
        with pytest.raises(vhd.Busy):
            vhd.check(p)
    with Image.open(p), Image.open(p):                 # two readers at once
        assert vhd.info(p).virtual_size == 4 * MIB
        with pytest.raises(vhd.Busy):
            vhd.write(p, 0, b"x")
    vhd.write(p, 0, b"x")                               # free again
    assert vhd.read(p, 0, 1) == b"x"


def test_coalesce_in_small_batches_into_a_differencing_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three levels; the middle one is coalesced in batches of 2 blocks."""
    monkeypatch.setattr(ops, "COALESCE_BATCH", 2)
    base, mid, leaf = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "leaf.vhd"
    size = vhd.create(base, 16 * MIB).virtual_size
    model = bytearray(size)
    d = pattern(1, size)
    vhd.write(base, 0, d)
    apply(model, 0, d)
    vhd.snapshot(base, mid)
    for seed, (off, n) in enumerate([(512, 1024), (BLOCK + 4096, BLOCK - 8192),
                                     (3 * BLOCK, BLOCK), (5 * BLOCK + 7, 9)], 10):
        d = pattern(seed, n)
        vhd.write(mid, off, d)
        apply(model, off, d)
    vhd.snapshot(mid, leaf)
    for seed, (off, n) in enumerate([(0, 100), (6 * BLOCK + 3, 700)], 30):
        d = pattern(seed, n)
        vhd.write(leaf, off, d)
        apply(model, off, d)
    mid_model = bytes(vhd.read(mid, 0, size))
    vhd.coalesce(leaf)                                  # leaf -> mid (differencing parent)
    assert vhd.read(mid, 0, size) == model
    assert vhd.read(leaf, 0, size) == model
    vhd.coalesce(mid)                                   # mid -> base (dynamic parent)
    assert vhd.read(base, 0, size) == model
    assert mid_model != model
    for p in (base, mid, leaf):
        assert vhd.check(p) == []


def test_coalesce_into_new_blocks_keeps_zeros_outside_the_child_sectors(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create(base, 4 * MIB)
    vhd.snapshot(base, leaf)
    vhd.write(leaf, BLOCK + 1024, b"\x07" * 512)
    with open(leaf, "r+b") as f:                        # stale bytes in an unset sector
        raw = leaf.read_bytes()
        header = fmt.Header.from_bytes(raw[512:1536])
        sector = struct.unpack(">I", raw[header.table_offset + 4 : header.table_offset + 8])[0]
        f.seek(sector * 512 + 512)
        f.write(b"\xee" * 512)
    assert vhd.read(leaf, BLOCK, 512) == bytes(512)
    vhd.coalesce(leaf)
    assert vhd.read(base, BLOCK, 4096) == bytes(1024) + b"\x07" * 512 + bytes(2560)


def test_unknown_versions_and_odd_sizes_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.vhd"
    vhd.create(p, 4 * MIB)
    raw = p.read_bytes()
    footer = fmt.Footer.from_bytes(raw[-512:])
    odd = footer.sealed(current_size=1000).to_bytes()
    with open(p, "r+b") as f:
        f.write(odd)
        f.seek(len(raw) - 512)
        f.write(odd)
    assert any("not a multiple of 512" in x for x in vhd.check(p))
    with pytest.raises(vhd.Corrupt, match="not a multiple of 512"):
        vhd.info(p)
    v2 = footer.sealed(version=0x00020000).to_bytes()
    with open(p, "r+b") as f:
        f.write(v2)
        f.seek(len(raw) - 512)
        f.write(v2)
    assert any("only 1.x" in x for x in vhd.check(p))
    with pytest.raises(vhd.Corrupt, match="only 1.x"):
        vhd.read(p, 0, 1)
    assert os.path.getsize(p) == len(raw)
