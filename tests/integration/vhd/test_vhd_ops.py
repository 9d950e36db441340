"""The operations of ``smcommon.vhd`` around the data path: create's limits and
errors, resize (grow and shrink), hidden flag, set_parent, repair, and the
largest image (2040 GiB) -- each checked against the model and qemu where it can.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import vhd

pytestmark = pytest.mark.integration

MIB = vp.MIB
GIB = 1024 * MIB


@pytest.mark.parametrize("size", [0, -1, vhd.MAX_VIRTUAL_SIZE + 1, 2**64, "8M", 1.5])
def test_create_refuses_bad_sizes_and_leaves_no_file(
    sr_dir: Path, size: object
) -> None:
    img = sr_dir / "bad.vhd"
    with pytest.raises(vhd.VhdError) as exc:
        vhd.create(str(img), size)  # type: ignore[arg-type]
    assert str(exc.value).strip()
    assert not img.exists(), "create left a file behind after an error"


def test_create_refuses_to_overwrite(sr_dir: Path) -> None:
    img = sr_dir / "a.vhd"
    img.write_bytes(b"precious")
    with pytest.raises(vhd.AlreadyExists):
        vhd.create(str(img), 2 * MIB)
    assert img.read_bytes() == b"precious"


def test_missing_image_is_not_found(sr_dir: Path) -> None:
    for op in (vhd.info, vhd.chain, vhd.check, lambda p: vhd.read(p, 0, 1)):
        with pytest.raises(vhd.NotFound):
            op(str(sr_dir / "nope.vhd"))


def test_largest_image_is_sparse_and_reads_zero_at_the_end(sr_dir: Path) -> None:
    img = sr_dir / "big.vhd"
    info = vhd.create(str(img), vhd.MAX_VIRTUAL_SIZE)
    assert info.virtual_size == 2040 * GIB
    assert os.stat(img).st_blocks * 512 < 5 * MIB
    end = vhd.MAX_VIRTUAL_SIZE
    vhd.write(str(img), end - 3, b"end")
    assert vhd.read(str(img), end - 4096, 4096) == bytes(4093) + b"end"
    assert vp.qemu_info(img)["virtual-size"] == end
    assert vhd.check(str(img)) == []


@pytest.mark.parametrize(
    ("fixed", "max_size"),
    [(False, None), (False, 32 * MIB), (True, None)],
    ids=["dynamic-no-room", "dynamic-max-size", "fixed"],
)
def test_grow_then_write_and_read(
    sr_dir: Path, fixed: bool, max_size: int | None
) -> None:
    img = str(sr_dir / "g.vhd")
    vhd.create(img, 8 * MIB, fixed=fixed, max_size=max_size)
    rng = random.Random(2)
    model = bytearray(8 * MIB)
    for off, length, s in vp.random_writes(rng, len(model), 10):
        vp.apply(model, off, vp.pattern(s, length))
        vhd.write(img, off, vp.pattern(s, length))
    for new in (13 * MIB + 5, 26 * MIB):  # rounded up to 14 MiB, then 26 MiB
        info = vhd.resize(img, new)
        assert info.virtual_size == vp.round_up(new, vhd.BLOCK_SIZE)
        model.extend(bytes(info.virtual_size - len(model)))
        assert vhd.read(img, 0, len(model)) == model
        for off, length, s in vp.random_writes(rng, len(model), 10):
            vp.apply(model, off, vp.pattern(s, length))
            vhd.write(img, off, vp.pattern(s, length))
        assert vhd.read(img, 0, len(model)) == model
        assert vhd.check(img) == []
        raw = sr_dir / "m.raw"
        raw.write_bytes(model)
        ok, why = vp.qemu_compare_raw(img, raw)
        assert ok, why


def test_grow_a_differencing_leaf_reads_zero_past_the_parent(sr_dir: Path) -> None:
    base, leaf = str(sr_dir / "b.vhd"), str(sr_dir / "l.vhd")
    vhd.create(base, 4 * MIB)
    vhd.write(base, 4 * MIB - 100, b"z" * 100)
    vhd.snapshot(base, leaf)
    vhd.resize(leaf, 8 * MIB)
    model = bytearray(8 * MIB)
    model[4 * MIB - 100 : 4 * MIB] = b"z" * 100
    assert vhd.read(leaf, 0, 8 * MIB) == model
    vhd.write(leaf, 4 * MIB - 50, b"y" * 5000)
    model[4 * MIB - 50 : 4 * MIB + 4950] = b"y" * 5000
    assert vhd.read(leaf, 0, 8 * MIB) == model
    assert vhd.read(base, 0, 4 * MIB) == model[: 4 * MIB - 100] + b"z" * 100
    assert vhd.check(leaf) == [] and vhd.check(base) == []


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_shrink_refused_over_data_allowed_over_zeros(sr_dir: Path, fixed: bool) -> None:
    img = str(sr_dir / "s.vhd")
    vhd.create(img, 16 * MIB, fixed=fixed)
    vhd.write(img, 9 * MIB, b"data")
    with pytest.raises(vhd.VhdError):
        vhd.resize(img, 8 * MIB)
    assert vhd.info(img).virtual_size == 16 * MIB
    assert vhd.read(img, 9 * MIB, 4) == b"data"
    info = vhd.resize(img, 10 * MIB)
    assert info.virtual_size == 10 * MIB
    assert vhd.read(img, 9 * MIB, 4) == b"data"
    assert vp.qemu_info(img)["virtual-size"] == 10 * MIB
    assert vhd.check(img) == []


def test_hidden_flag_round_trips(sr_dir: Path) -> None:
    img = str(sr_dir / "h.vhd")
    vhd.create(img, 2 * MIB)
    assert vhd.info(img).hidden is False
    vhd.set_hidden(img, True)
    assert vhd.info(img).hidden is True
    assert vp.layout(img).footer["hidden"] == 1
    vhd.set_hidden(img, False)
    assert vhd.info(img).hidden is False
    assert vhd.check(img) == []


def test_set_parent_refuses_a_missing_or_wrong_parent(sr_dir: Path) -> None:
    base, leaf = str(sr_dir / "b.vhd"), str(sr_dir / "l.vhd")
    vhd.create(base, 4 * MIB)
    vhd.snapshot(base, leaf)
    with pytest.raises(vhd.VhdError):
        vhd.set_parent(leaf, str(sr_dir / "missing.vhd"))
    with pytest.raises(vhd.VhdError):
        vhd.set_parent(leaf, leaf)  # its own parent: a loop
    assert [Path(p).resolve() for p in vhd.chain(leaf)] == [
        Path(leaf).resolve(),
        Path(base).resolve(),
    ]


def test_repair_of_a_sound_image_repairs_nothing(sr_dir: Path) -> None:
    img = str(sr_dir / "r.vhd")
    vhd.create(img, 4 * MIB)
    vhd.write(img, 100, b"abc")
    assert vhd.repair(img) == []
    assert vhd.read(img, 100, 3) == b"abc"


def test_repair_restores_a_damaged_tail_footer(sr_dir: Path) -> None:
    img = str(sr_dir / "r.vhd")
    vhd.create(img, 4 * MIB)
    vhd.write(img, 100, b"abc")
    lay = vp.layout(img)
    vp.patch(img, lay.footer_at, b"garbage!")
    assert vhd.check(img) != []
    assert vhd.repair(img) != []
    assert vhd.check(img) == []
    assert vhd.read(img, 100, 3) == b"abc"
    assert vp.qemu_info(img)["virtual-size"] == 4 * MIB


def test_bad_arguments_are_vhd_errors(sr_dir: Path) -> None:
    img = str(sr_dir / "a.vhd")
    vhd.create(img, 4 * MIB)
    bad_calls = [
        lambda: vhd.read(img, 0, -1),
        lambda: vhd.read(img, -1, 10),
        lambda: vhd.read(img, 0, 2**62),
        lambda: vhd.write(img, 2**62, b"x"),
        lambda: vhd.resize(img, -5),
        lambda: vhd.resize(img, vhd.MAX_VIRTUAL_SIZE + 1),
        lambda: vhd.coalesce(img),  # no parent
        lambda: vhd.create(str(sr_dir / "no-dir" / "x.vhd"), 2 * MIB),
        lambda: vhd.create(str(sr_dir), 2 * MIB),  # a directory
        lambda: vhd.info(str(sr_dir)),
        lambda: vhd.snapshot(str(sr_dir / "missing.vhd"), str(sr_dir / "child.vhd")),
        lambda: vhd.snapshot(img, img),
        lambda: vhd.import_raw(str(sr_dir / "missing.raw"), str(sr_dir / "i.vhd")),
        lambda: vhd.export_raw(str(sr_dir / "missing.vhd"), str(sr_dir / "o.raw")),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(vhd.VhdError) as exc:
            call()
        assert str(exc.value).strip(), f"call {i}: empty message"
    for name in ("child.vhd", "i.vhd", "o.raw"):
        assert not (sr_dir / name).exists(), f"{name} left behind by a failed call"
    assert vhd.read(img, 0, 4 * MIB) == bytes(4 * MIB)
    assert vhd.check(img) == []


def test_snapshot_refuses_to_overwrite(sr_dir: Path) -> None:
    base, other = str(sr_dir / "b.vhd"), sr_dir / "o.vhd"
    vhd.create(base, 2 * MIB)
    other.write_bytes(b"keep")
    with pytest.raises(vhd.AlreadyExists):
        vhd.snapshot(base, str(other))
    assert other.read_bytes() == b"keep"


def test_chain_over_a_fixed_base_reads_and_coalesces(sr_dir: Path) -> None:
    base, mid, leaf = (str(sr_dir / n) for n in ("fixed.vhd", "mid.vhd", "leaf.vhd"))
    size = 8 * MIB
    vhd.create(base, size, fixed=True)
    rng = random.Random(6)
    model = bytearray(size)
    for parent, path in ((None, base), (base, mid), (mid, leaf)):
        if parent is not None:
            vhd.snapshot(parent, path)
        for off, length, s in vp.random_writes(rng, size, 8, align=4096):
            vhd.write(path, off, vp.pattern(s, length))
            vp.apply(model, off, vp.pattern(s, length))
    assert vhd.read(leaf, 0, size) == model
    try:
        import pyvhdi  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:  # 4 KiB-aligned writes: libvhdi misreads partly-set bitmap bytes
        assert vp.libvhdi_read_chain([leaf, mid, base], 0, size) == model
    vhd.coalesce(leaf)
    vhd.coalesce(mid)
    assert vhd.read(base, 0, size) == model
    assert vhd.info(base).disk_type == "fixed"
    raw = sr_dir / "m.raw"
    raw.write_bytes(model)
    ok, why = vp.qemu_compare_raw(base, raw)
    assert ok, why
    assert vhd.check(base) == []


def test_wrong_python_types_are_vhd_errors(sr_dir: Path) -> None:
    """Callers outside Python (the CLI, the engine's wire input) can pass what
    they like: a wrong type must be an InvalidArgument naming it, not a TypeError."""
    img = str(sr_dir / "t.vhd")
    vhd.create(img, 4 * MIB)
    bad_calls = {
        "read offset '0'": lambda: vhd.read(img, "0", 10),  # type: ignore[arg-type]
        "read offset 0.5": lambda: vhd.read(img, 0.5, 10),  # type: ignore[arg-type]
        "write offset '0'": lambda: vhd.write(img, "0", b"x"),  # type: ignore[arg-type]
        "write data str": lambda: vhd.write(img, 0, "text"),  # type: ignore[arg-type]
        "write data None": lambda: vhd.write(img, 0, None),  # type: ignore[arg-type]
    }
    wrong = []
    for what, call in bad_calls.items():
        try:
            call()
        except vhd.VhdError:
            continue
        except Exception as exc:  # noqa: BLE001 - reporting is the point
            wrong.append(f"{what}: {type(exc).__name__}: {exc}")
        else:
            wrong.append(f"{what}: accepted")
    assert not wrong, "; ".join(wrong)
    assert vhd.read(img, 0, 4 * MIB) == bytes(4 * MIB)


def test_repair_restores_a_damaged_head_copy(sr_dir: Path) -> None:
    img = str(sr_dir / "h.vhd")
    vhd.create(img, 4 * MIB)
    vhd.write(img, 100, b"abc")
    vp.patch(img, 0, b"garbage!")
    assert vhd.check(img) != [], "a damaged footer copy at offset 0 goes unnoticed"
    assert vhd.repair(img) != []
    assert vhd.check(img) == []
    assert vp.layout(img).footer["cookie"] == b"conectix"
    with open(img, "rb") as f:
        assert f.read(8) == b"conectix"
    assert vhd.read(img, 100, 3) == b"abc"


def test_outputs_never_land_on_an_image(sr_dir: Path) -> None:
    """export/import/convert refuse a destination that is an image (of the chain or not),
    and the images stay whole."""
    base, leaf = str(sr_dir / "b.vhd"), str(sr_dir / "l.vhd")
    vhd.create(base, 4 * MIB)
    vhd.write(base, 0, b"base")
    vhd.snapshot(base, leaf)
    vhd.write(leaf, 10, b"leaf")
    expected = vhd.read(leaf, 0, 4 * MIB)
    raw = sr_dir / "x.raw"
    raw.write_bytes(expected)
    for call in (
        lambda: vhd.export_raw(leaf, base),
        lambda: vhd.export_raw(leaf, leaf),
        lambda: vhd.import_raw(str(raw), base),
        lambda: vhd.convert(leaf, base),
        lambda: vhd.convert(leaf, leaf),
    ):
        with pytest.raises(vhd.VhdError):
            call()
    assert vhd.check(base) == [] and vhd.check(leaf) == []
    assert vhd.read(leaf, 0, 4 * MIB) == expected
    # a raw destination is replaced, like qemu-img convert does
    old = sr_dir / "old.raw"
    old.write_bytes(b"z" * (6 * MIB))
    vhd.export_raw(leaf, str(old))
    assert old.read_bytes() == expected
