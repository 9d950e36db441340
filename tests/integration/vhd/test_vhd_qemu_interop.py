"""Interoperability of ``smcommon.vhd`` with qemu's VHD (``vpc``) driver, both ways.

Library-written fixed and dynamic images must open in ``qemu-img info`` with the
same virtual size and compare identical (``qemu-img compare -s``) to a raw file
holding the bytes the test wrote; qemu-made images (creator ``qemu``, whose size
qemu derives from CHS geometry) must read back through the library exactly as
``qemu-img convert -O raw`` reads them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import vhd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not vp.have("qemu-img"), reason="qemu-img (qemu-utils) is not installed"
    ),
]

MIB = vp.MIB


def _raw(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("size", [1, 2 * MIB, 5 * MIB + 123, 16 * MIB])
def test_created_image_opens_in_qemu_with_the_same_size(
    sr_dir: Path, fixed: bool, size: int
) -> None:
    img = sr_dir / "a.vhd"
    info = vhd.create(str(img), size, fixed=fixed)
    expected = vp.round_up(size, vhd.BLOCK_SIZE)
    assert info.virtual_size == expected
    assert info.disk_type == ("fixed" if fixed else "dynamic")
    assert info.parent is None and info.depth == 1
    assert vp.qemu_info(img)["virtual-size"] == expected
    ok, why = vp.qemu_compare_raw(img, _raw(sr_dir / "zero.raw", bytes(expected)))
    assert ok, why
    assert vhd.check(str(img)) == []


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_compare_identical_in_qemu(
    sr_dir: Path, fixed: bool, seed: int
) -> None:
    size = 16 * MIB
    img = sr_dir / "w.vhd"
    vhd.create(str(img), size, fixed=fixed)
    rng = random.Random(seed)
    model = bytearray(size)
    writes = vp.random_writes(rng, size, 40)
    # the edges: first byte, last byte, a write ending exactly at the end
    writes += [(0, 1, 11), (size - 1, 1, 12), (size - 4097, 4097, 13)]
    for off, length, s in writes:
        data = vp.pattern(s, length)
        vhd.write(str(img), off, data)
        vp.apply(model, off, data)
    assert vhd.read(str(img), 0, size) == model
    assert vp.qemu_info(img)["virtual-size"] == size
    ok, why = vp.qemu_compare_raw(img, _raw(sr_dir / "model.raw", model))
    assert ok, why
    assert vhd.check(str(img)) == []
    info = vhd.info(str(img))
    if not fixed:
        touched = {
            b
            for off, ln, _ in writes
            for b in range(off // vp.BLOCK, (off + ln - 1) // vp.BLOCK + 1)
        }
        assert info.allocated_blocks == len(touched)
    # a fresh process sees the same (nothing is held only in memory)
    out = sr_dir / "export.raw"
    vhd.export_raw(str(img), str(out))
    assert out.read_bytes() == model


def test_write_past_the_end_is_refused(sr_dir: Path) -> None:
    img = sr_dir / "e.vhd"
    vhd.create(str(img), 4 * MIB)
    with pytest.raises(vhd.VhdError):
        vhd.write(str(img), 4 * MIB - 10, b"x" * 11)
    with pytest.raises(vhd.VhdError):
        vhd.write(str(img), -1, b"x")
    with pytest.raises(vhd.VhdError):
        vhd.read(str(img), 4 * MIB, 1)
    assert vhd.read(str(img), 0, 4 * MIB) == bytes(4 * MIB)
    assert vhd.check(str(img)) == []


def _qemu_made(
    sr_dir: Path, size: int, subformat: str
) -> tuple[Path, list[tuple[int, int, int]]]:
    img = sr_dir / f"q-{subformat}.vhd"
    res = vp.tool(
        [
            "qemu-img",
            "create",
            "-f",
            "vpc",
            "-o",
            f"subformat={subformat}",
            str(img),
            str(size),
        ]
    )
    assert res.returncode == 0, res.stderr
    rng = random.Random(size)
    virt = int(vp.qemu_info(img)["virtual-size"])  # type: ignore[call-overload]
    writes = [(0, 512, 0xAB), (virt - 4096, 4096, 0xCD)]
    for _ in range(6):
        length = rng.choice([512, 4096, 65536, 3 * MIB + 512, 777])
        off = rng.randrange(0, virt - length)
        writes.append((off, length, rng.randrange(1, 256)))
    for off, length, byte in writes:
        vp.qemu_io_write(img, off, length, byte)
    return img, writes


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [10 * MIB, 33 * MIB + 5, 64 * MIB])
def test_qemu_made_image_reads_back_through_the_library(
    sr_dir: Path, subformat: str, size: int
) -> None:
    img, writes = _qemu_made(sr_dir, size, subformat)
    virt = int(vp.qemu_info(img)["virtual-size"])  # type: ignore[call-overload]
    ref = sr_dir / "qemu.raw"
    vp.qemu_to_raw(img, ref)
    expected = ref.read_bytes()
    assert len(expected) == virt
    info = vhd.info(str(img))
    assert info.creator.rstrip("\0 ") == "qemu"
    assert info.virtual_size == virt, (
        "the library and qemu disagree on the size of a qemu image"
    )
    out = sr_dir / "lib.raw"
    vhd.export_raw(str(img), str(out))
    assert out.read_bytes() == expected
    for off, length, _ in writes:
        assert vhd.read(str(img), off, length) == expected[off : off + length]
    rng = random.Random(7)
    for _ in range(10):
        off = rng.randrange(0, virt)
        length = rng.randint(1, min(virt - off, 3 * MIB))
        assert vhd.read(str(img), off, length) == expected[off : off + length]
    assert vhd.check(str(img)) == []


def test_qemu_converted_image_reads_back_through_the_library(sr_dir: Path) -> None:
    size = 24 * MIB + 4096
    rng = random.Random(5)
    src = bytearray(size)
    for _ in range(12):  # data with holes, so some blocks stay unallocated
        off = rng.randrange(0, size - 300_000)
        src[off : off + 300_000] = rng.randbytes(300_000)
    raw = _raw(sr_dir / "src.raw", src)
    img = sr_dir / "conv.vhd"
    res = vp.tool(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic",
            str(raw),
            str(img),
        ]
    )
    assert res.returncode == 0, res.stderr
    ref = sr_dir / "ref.raw"
    vp.qemu_to_raw(img, ref)
    expected = ref.read_bytes()
    assert expected[:size] == src and not any(expected[size:])
    assert vhd.info(str(img)).virtual_size == len(expected)
    out = sr_dir / "lib.raw"
    vhd.export_raw(str(img), str(out))
    assert out.read_bytes() == expected
    assert vhd.read(str(img), 0, len(expected)) == expected


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_import_export_round_trip_agrees_with_qemu(sr_dir: Path, fixed: bool) -> None:
    size = 12 * MIB
    rng = random.Random(9)
    src = bytearray(size)
    src[MIB : 3 * MIB] = rng.randbytes(2 * MIB)  # blocks 0 and 1
    src[9 * MIB + 17 : 9 * MIB + 100] = rng.randbytes(83)  # block 4
    raw = _raw(sr_dir / "src.raw", src)
    img = sr_dir / "imp.vhd"
    info = vhd.import_raw(str(raw), str(img), fixed=fixed)
    assert info.virtual_size == size
    if not fixed:
        assert info.allocated_blocks == 3, "zero blocks must stay unallocated"
    ok, why = vp.qemu_compare_raw(img, raw)
    assert ok, why
    out = sr_dir / "out.raw"
    vhd.export_raw(str(img), str(out))
    assert out.read_bytes() == src
    assert vhd.check(str(img)) == []


def test_qemu_io_writes_into_a_library_image(sr_dir: Path) -> None:
    """qemu's writer appends new blocks where the footer was; the library must read
    them, keep writing, and find the image sound."""
    img = sr_dir / "mixed.vhd"
    size = 16 * MIB
    vhd.create(str(img), size)
    vhd.write(str(img), 3 * MIB, b"L" * 70_000)
    for off, length, byte in [
        (0, 4096, 0xAB),
        (9 * MIB - 512, 4096, 0xCD),
        (3 * MIB + 1024, 512, 0xEF),
    ]:
        vp.qemu_io_write(img, off, length, byte)
    ref = sr_dir / "q.raw"
    vp.qemu_to_raw(img, ref)
    expected = bytearray(ref.read_bytes())
    assert vhd.read(str(img), 0, size) == expected
    assert vhd.check(str(img)) == []
    data = vp.pattern(3, 3 * MIB)
    vhd.write(str(img), 12 * MIB + 5, data[: size - 12 * MIB - 5])
    vp.apply(expected, 12 * MIB + 5, data[: size - 12 * MIB - 5])
    raw = sr_dir / "m.raw"
    raw.write_bytes(expected)
    ok, why = vp.qemu_compare_raw(img, raw)
    assert ok, why
    assert vhd.check(str(img)) == []


def test_library_writes_into_a_qemu_image_and_qemu_reads_them(sr_dir: Path) -> None:
    """A qemu-made dynamic image (CHS size, not a whole number of blocks) written
    by the library, directly and through a coalesced child, reads the same in qemu."""
    img, _ = _qemu_made(sr_dir, 10 * MIB, "dynamic")
    virt = int(vp.qemu_info(img)["virtual-size"])  # type: ignore[call-overload]
    ref = sr_dir / "start.raw"
    vp.qemu_to_raw(img, ref)
    model = bytearray(ref.read_bytes())
    rng = random.Random(17)
    for off, length, s in vp.random_writes(rng, virt, 15):
        vhd.write(str(img), off, vp.pattern(s, length))
        vp.apply(model, off, vp.pattern(s, length))
    vhd.write(str(img), virt - 3, b"end")  # the partial last block
    vp.apply(model, virt - 3, b"end")
    child = sr_dir / "child.vhd"
    vhd.snapshot(str(img), str(child))
    for off, length, s in vp.random_writes(rng, virt, 10):
        vhd.write(str(child), off, vp.pattern(s, length))
        vp.apply(model, off, vp.pattern(s, length))
    assert vhd.read(str(child), 0, virt) == model
    vhd.coalesce(str(child))
    assert vhd.check(str(img)) == []
    raw = sr_dir / "model.raw"
    raw.write_bytes(model)
    ok, why = vp.qemu_compare_raw(img, raw)
    assert ok, why


def test_qemu_over_the_batmap_of_an_empty_image_is_reported_and_repaired(
    sr_dir: Path,
) -> None:
    """qemu's writer puts its first block right after the BAT, where libvhd
    requires the batmap header (nothing in the image can steer it elsewhere):
    check names the foreign block, reads keep working, writes wait for repair,
    and repair moves qemu's block to the end and rebuilds the batmap; qemu
    then reads the same disk, and appends later blocks past the last one."""
    import libvhd_style as lv

    img = sr_dir / "fresh.vhd"
    size = 16 * MIB
    vhd.create(str(img), size)
    vp.qemu_io_write(img, 3 * MIB, 8192, 0xAB)
    problems = vhd.check(str(img))
    assert problems and "qemu" in problems[0] and "repair" in problems[0], problems
    ref = sr_dir / "qemu.raw"
    vp.qemu_to_raw(img, ref)
    expected = ref.read_bytes()
    assert vhd.read(str(img), 0, size) == expected
    with pytest.raises(vhd.Corrupt, match="run repair"):
        vhd.write(str(img), 0, b"refused")
    done = vhd.repair(str(img))
    assert any("moved data block" in d for d in done), done
    assert vhd.check(str(img)) == [] and lv.problems(img) == []
    assert vhd.read(str(img), 0, size) == expected
    ok, why = vp.qemu_compare_raw(img, ref)
    assert ok, why
    assert lv.read(img, 0, size) == expected                 # libvhd reads it alike
    model = bytearray(expected)
    vhd.write(str(img), 0, b"ours")
    model[0:4] = b"ours"
    vp.qemu_io_write(img, 9 * MIB, 4096, 0xCD)               # after the last block now
    model[9 * MIB : 9 * MIB + 4096] = b"\xcd" * 4096
    assert vhd.check(str(img)) == []
    assert vhd.read(str(img), 0, size) == model
    ok, why = vp.qemu_compare_raw(img, _raw(sr_dir / "model.raw", model))


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_coalesce_of_scattered_pieces_compares_identical_in_qemu(
    sr_dir: Path, fixed: bool
) -> None:
    """Coalesce copies only the child's sectors (a run each); a block new to a
    dynamic parent keeps a full bitmap and its unwritten sectors are the file's
    hole: qemu, which reads the data area and ignores bitmaps, reads zeros."""
    size = 16 * MIB
    base, leaf = sr_dir / "base.vhd", sr_dir / "leaf.vhd"
    vhd.create(str(base), size, fixed=fixed)
    model = bytearray(size)
    vhd.write(str(base), 3 * vp.BLOCK, vp.pattern(1, vp.BLOCK))
    vp.apply(model, 3 * vp.BLOCK, vp.pattern(1, vp.BLOCK))
    vhd.snapshot(str(base), str(leaf))
    rng = random.Random(5)
    # blocks touched in reverse order: the child's file order is not block order
    for b in reversed(range(size // vp.BLOCK)):
        for _ in range(rng.randrange(0, 4)):
            off = b * vp.BLOCK + rng.randrange(0, vp.BLOCK // 4096) * 4096
            data = vp.pattern(rng.randrange(1000), rng.choice([512, 4096, 65536 - 512]))
            data = data[: min(len(data), (b + 1) * vp.BLOCK - off)]
            vhd.write(str(leaf), off, data)
            vp.apply(model, off, data)
    assert vhd.read(str(leaf), 0, size) == model
    vhd.coalesce(str(leaf))
    assert vhd.read(str(base), 0, size) == model
    assert vhd.check(str(base)) == []
    ok, why = vp.qemu_compare_raw(base, _raw(sr_dir / "model.raw", model))
    assert ok, why
