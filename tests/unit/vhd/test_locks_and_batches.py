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


class _Killed(Exception):
    pass


def _cut_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th pwrite/pwritev/fdatasync/copy_file_range raise (a kill there)."""
    calls = {"n": 0}
    for name in ("pwrite", "pwritev", "fdatasync", "copy_file_range"):
        real = getattr(os, name)

        def wrapper(*a: object, _real=real) -> object:  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == n:
                raise _Killed()
            return _real(*a)

        monkeypatch.setattr(os, name, wrapper)


@pytest.mark.parametrize("cut", range(1, 16))
def test_bat_growth_interrupted_anywhere_is_sound_and_rerunnable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    p = tmp_path / "a.vhd"
    size = vhd.create(p, 8 * MIB).virtual_size
    model = bytearray(size)
    for b in range(4):
        d = pattern(b, BLOCK)
        vhd.write(p, b * BLOCK, d)
        apply(model, b * BLOCK, d)
    _cut_after(monkeypatch, cut)
    try:
        vhd.resize(p, 64 * 2**30)
    except _Killed:
        pass
    monkeypatch.undo()
    assert vhd.check(p) == []
    assert vhd.read(p, 0, size) == model
    assert vhd.resize(p, 64 * 2**30).virtual_size == 64 * 2**30
    assert vhd.check(p) == [] and vhd.read(p, 0, size) == model


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8, 13, 21])
def test_coalesce_interrupted_anywhere_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    monkeypatch.setattr(ops, "COALESCE_BATCH", 2)
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    size = vhd.create(base, 12 * MIB).virtual_size
    vhd.write(base, BLOCK, pattern(1, BLOCK))
    before = vhd.read(base, 0, size)
    vhd.snapshot(base, leaf)
    for b in (0, 1, 3, 5):
        vhd.write(leaf, b * BLOCK + 4096, pattern(10 + b, 8192))
    merged = vhd.read(leaf, 0, size)
    _cut_after(monkeypatch, cut)
    try:
        vhd.coalesce(leaf)
    except _Killed:
        pass
    monkeypatch.undo()
    assert vhd.check(base) == [] and vhd.check(leaf) == []
    assert vhd.read(leaf, 0, size) == merged
    got = vhd.read(base, 0, size)
    assert all(got[i] in (before[i], merged[i]) for i in range(0, size, 4096))
    vhd.coalesce(leaf)
    assert vhd.read(base, 0, size) == merged
