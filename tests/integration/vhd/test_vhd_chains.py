"""Differencing chains written by ``smcommon.vhd``, proven against libvhdi (pyvhdi).

Each level of a 3+ level chain must read the same through the library and through
libvhdi (each file opened with ``pyvhdi.file()``, children linked to parents with
``set_parent``), and the same as an in-memory model of that level.  Also covers
chain(), info() of children, convert() (flatten) and allocation_map().

libvhdi misreads sectors whose sector-bitmap byte is only partly set (a byte covers
8 sectors = 4 KiB), so every write here is 4 KiB-aligned in offset and length.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import vhd

pytestmark = pytest.mark.integration

MIB = vp.MIB
SIZE = 16 * MIB
K4 = 4096


def _build_chain(
    d: Path, levels: int, seed: int
) -> tuple[list[str], dict[str, bytearray], list[list[tuple[int, int, int]]]]:
    """base <- c1 <- c2 ... ; returns paths root first, models per path, writes per level."""
    rng = random.Random(seed)
    paths = [str(d / "base.vhd")]
    vhd.create(paths[0], SIZE)
    models = {paths[0]: bytearray(SIZE)}
    all_writes = []
    for level in range(levels):
        cur = paths[-1]
        writes = vp.random_writes(rng, SIZE, 12, align=K4, max_len=3 * MIB)
        for off, length, s in writes:
            data = vp.pattern(s, length)
            vhd.write(cur, off, data)
            vp.apply(models[cur], off, data)
        all_writes.append(writes)
        if level < levels - 1:
            child = str(d / f"c{level + 1}.vhd")
            info = vhd.snapshot(cur, child)
            assert info.disk_type == "differencing"
            models[child] = bytearray(models[cur])
            paths.append(child)
    return paths, models, all_writes


@pytest.mark.parametrize("levels", [3, 5])
def test_chain_reads_the_same_in_libvhdi(sr_dir: Path, levels: int) -> None:
    pyvhdi = pytest.importorskip("pyvhdi", reason="libvhdi-python is not installed")
    paths, models, _ = _build_chain(sr_dir, levels, seed=levels)
    for i, p in enumerate(paths):
        lineage = list(reversed(paths[: i + 1]))  # leaf first
        assert [Path(x).resolve() for x in vhd.chain(p)] == [
            Path(x).resolve() for x in lineage
        ]
        info = vhd.info(p)
        assert info.depth == i + 1
        assert info.virtual_size == SIZE
        if i:
            parent_info = vhd.info(paths[i - 1])
            assert Path(info.parent or "").resolve() == Path(paths[i - 1]).resolve()
            assert info.parent_uuid == parent_info.uuid
        mine = vhd.read(p, 0, SIZE)
        assert mine == models[p], f"library read of level {i} differs from the model"
        theirs = vp.libvhdi_read_chain(lineage, 0, SIZE)
        assert theirs == mine, f"libvhdi and the library disagree on level {i}"
        assert vhd.check(p) == []
    # libvhdi sees the parent identifiers the library wrote
    f = pyvhdi.file()
    f.open(paths[-1])
    try:
        assert str(f.parent_identifier).lower() == vhd.info(paths[-2]).uuid.lower()
    finally:
        f.close()


def test_unaligned_writes_in_a_chain_read_back(sr_dir: Path) -> None:
    """Unaligned writes into differencing images, against the model only (not libvhdi)."""
    base = str(sr_dir / "b.vhd")
    vhd.create(base, SIZE)
    rng = random.Random(3)
    model = bytearray(SIZE)
    cur = base
    for level in range(4):
        for off, length, s in vp.random_writes(rng, SIZE, 15):
            data = vp.pattern(s, length)
            vhd.write(cur, off, data)
            vp.apply(model, off, data)
        assert vhd.read(cur, 0, SIZE) == model
        child = str(sr_dir / f"u{level}.vhd")
        vhd.snapshot(cur, child)
        cur = child
    assert vhd.read(cur, 0, SIZE) == model
    out = sr_dir / "flat.raw"
    vhd.export_raw(cur, str(out))
    assert out.read_bytes() == model


def test_convert_flattens_a_chain(sr_dir: Path) -> None:
    paths, models, _ = _build_chain(sr_dir, 4, seed=11)
    dest = str(sr_dir / "flat.vhd")
    info = vhd.convert(paths[-1], dest)
    assert info.disk_type == "dynamic" and info.parent is None
    assert info.virtual_size == SIZE
    assert vhd.read(dest, 0, SIZE) == models[paths[-1]]
    assert vhd.check(dest) == []
    raw = sr_dir / "m.raw"
    raw.write_bytes(models[paths[-1]])
    if vp.have("qemu-img"):
        ok, why = vp.qemu_compare_raw(dest, raw)
        assert ok, why
    # sparse: no more blocks than the chain holds data for
    nonzero = sum(
        1
        for b in range(SIZE // vp.BLOCK)
        if any(models[paths[-1]][b * vp.BLOCK : (b + 1) * vp.BLOCK])
    )
    assert info.allocated_blocks <= nonzero


def test_allocation_map_covers_the_disk_and_finds_the_data(sr_dir: Path) -> None:
    paths, _models, writes = _build_chain(sr_dir, 3, seed=21)
    leaf = paths[-1]
    amap = vhd.allocation_map(leaf)
    pos = 0
    for off, length, depth in amap:
        assert off == pos and length > 0, f"gap or overlap in allocation_map at {off}"
        assert depth >= 0
        pos += length
    assert pos == SIZE

    def depth_at(byte: int) -> int:
        for off, length, depth in amap:
            if off <= byte < off + length:
                return depth
        raise AssertionError(byte)

    # the leaf's own writes live at the leaf: the same depth for all of them,
    # and different from where the base's writes (not overwritten later) live
    leaf_depths = {depth_at(off) for off, _, _ in writes[-1]}
    assert len(leaf_depths) == 1 and 0 not in leaf_depths
    # bytes no level ever wrote are reported as depth 0 (no data)
    written = bytearray(SIZE)
    for level in writes:
        for off, length, _ in level:
            written[off : off + length] = b"\1" * length
    unwritten_blocks = [
        b
        for b in range(SIZE // vp.BLOCK)
        if not any(written[b * vp.BLOCK : (b + 1) * vp.BLOCK])
    ]
    for b in unwritten_blocks:
        assert depth_at(b * vp.BLOCK) == 0


def test_unicode_and_spaced_names_link_for_libvhdi(sr_dir: Path) -> None:
    """Parent names are UTF-16 in the header and W2ru/W2ku locators: non-ASCII
    (including characters outside the BMP) and spaces must survive."""
    pyvhdi = pytest.importorskip("pyvhdi", reason="libvhdi-python is not installed")
    names = ["é ü 日本.vhd", "a b.vhd", "😀" * 20 + ".vhd", "z" * 150 + ".vhd"]
    paths = [str(sr_dir / n) for n in names]
    size = 4 * MIB
    model = bytearray(size)
    for i, p in enumerate(paths):
        if i == 0:
            vhd.create(p, size)
        else:
            vhd.snapshot(paths[i - 1], p)
        data = vp.pattern(i, 8192)
        vhd.write(p, i * 8192, data)
        vp.apply(model, i * 8192, data)
    lineage = list(reversed(paths))
    assert [Path(x).resolve() for x in vhd.chain(paths[-1])] == [
        Path(x).resolve() for x in lineage
    ]
    assert vhd.read(paths[-1], 0, size) == model
    assert vp.libvhdi_read_chain(lineage, 0, size) == model
    for child, parent in zip(paths[1:], paths, strict=False):
        f = pyvhdi.file()
        f.open(child)
        try:
            assert f.parent_filename == Path(parent).name
        finally:
            f.close()


def test_longest_legal_file_name(sr_dir: Path) -> None:
    """A 255-byte name is legal on ext4; create and snapshot must accept it."""
    base = sr_dir / ("b" * 251 + ".vhd")
    leaf = sr_dir / ("l" * 251 + ".vhd")
    vhd.create(str(base), 2 * MIB)
    vhd.snapshot(str(base), str(leaf))
    vhd.write(str(leaf), 0, b"ok")
    assert vhd.read(str(leaf), 0, 2) == b"ok"
    assert Path(vhd.info(str(leaf)).parent or "").resolve() == base.resolve()
