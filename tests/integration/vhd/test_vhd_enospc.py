"""A full filesystem: writes that cannot allocate fail with a VhdError, the image
stays sound with every acknowledged write, and writing resumes once there is room.
Uses a small tmpfs mounted for the test (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import vhd

pytestmark = [pytest.mark.integration, pytest.mark.root]

MIB = vp.MIB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(
            ["umount", str(mnt)], capture_output=True, timeout=30, check=False
        )


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_disk_full_refuses_cleanly_and_resumes(small_fs: Path, kind: str) -> None:
    size = 64 * MIB
    img = str(small_fs / "img.vhd")
    if kind == "dynamic":
        vhd.create(img, size)
    else:
        base = str(small_fs / "base.vhd")
        vhd.create(base, size)
        vhd.write(base, 0, vp.pattern(1, MIB))
        vhd.snapshot(base, img)
    filler = small_fs / "filler"
    filler.write_bytes(b"f" * (4 * MIB))
    model = bytearray(size)
    if kind == "differencing":
        model[:MIB] = vp.pattern(1, MIB)
    refused = None
    for b in range(size // vp.BLOCK):
        data = vp.pattern(100 + b, 300_000)
        try:
            vhd.write(img, b * vp.BLOCK + 1000, data)
        except vhd.VhdError as exc:
            refused = exc
            break
        except OSError as exc:  # pragma: no cover - the failure this test exists for
            pytest.fail(f"a full disk escaped as {type(exc).__name__}: {exc}")
        vp.apply(model, b * vp.BLOCK + 1000, data)
    assert refused is not None, "the filesystem never filled up"
    assert "space" in str(refused).lower(), str(refused)
    assert vhd.check(img) == [], "the image is damaged after a refused write"
    assert vhd.read(img, 0, size) == model
    # writes into allocated blocks need no space and still work
    vhd.write(img, 1000, b"still-writable")
    vp.apply(model, 1000, b"still-writable")
    filler.unlink()
    data = vp.pattern(7, 300_000)
    vhd.write(img, 40 * MIB + 3, data)
    vp.apply(model, 40 * MIB + 3, data)
    assert vhd.read(img, 0, size) == model
    assert vhd.check(img) == []
