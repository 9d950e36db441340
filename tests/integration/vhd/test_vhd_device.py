"""Images inside block devices (the container seam of ``smcommon.vhd.image``).

A logical volume is larger than the image it holds and what follows the image
is stale.  Here real loop devices over ranges of one backing file stand for
logical volumes on a physical volume (root only: ``losetup``); the backing file
is filled with stale bytes first, and a previous image is left in a device
before a new one is created over it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from smcommon import vhd
from smcommon.vhd import format as fmt
from smcommon.vhd.image import Image, device_tail

pytestmark = [pytest.mark.integration, pytest.mark.root]

MiB = 1024 * 1024
BLOCK = 2 * MiB


def pat(tag: str, n: int = 4096) -> bytes:
    raw = (tag.encode() + b"-") * (n // (len(tag) + 1) + 1)
    return raw[:n]


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Callable[[int, int], str]]:
    """devices(offset, size) -> a loop device over that range of one stale file."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    backing = tmp_path / "pv.img"
    with open(backing, "wb") as f:
        f.write(b"STALE-BYTES-" * (64 * MiB // 12))
    loops: list[str] = []

    def make(offset: int, size: int) -> str:
        p = subprocess.run(
            ["losetup", "--find", "--show", "--offset", str(offset),
             "--sizelimit", str(size), str(backing)],
            capture_output=True, text=True, check=False,
        )
        if p.returncode != 0:
            pytest.skip(f"losetup: {p.stderr.strip()}")
        loops.append(p.stdout.strip())
        return loops[-1]

    try:
        yield make
    finally:
        for dev in reversed(loops):
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@pytest.fixture
def devdir(tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    d.mkdir()
    return d


def link(devdir: Path, name: str, dev: str) -> str:
    (devdir / name).symlink_to(dev)
    return str(devdir / name)


def test_an_image_ends_after_its_last_block_not_at_the_device_end(
    devices: Callable[[int, int], str], devdir: Path
) -> None:
    path = link(devdir, "a", devices(0, 16 * MiB))
    info = vhd.create(path, 40 * MiB)
    assert info.virtual_size == 40 * MiB
    assert info.physical_size < 64 * 1024, "the image is its metadata, not the device"
    assert vhd.check(path) == []
    vhd.write(path, BLOCK + 512, pat("one", 8192))
    after = vhd.info(path)
    assert after.allocated_blocks == 1
    grown = after.physical_size - info.physical_size
    assert 512 + BLOCK <= grown < 512 + BLOCK + 4096  # a block (data 4 KiB aligned)
    assert vhd.read(path, BLOCK + 512, 8192) == pat("one", 8192)
    assert vhd.read(path, 0, 4096) == bytes(4096)
    assert vhd.check(path) == []


def test_a_new_image_over_an_old_one_ignores_the_stale_bytes(
    devices: Callable[[int, int], str], devdir: Path
) -> None:
    """The device held a larger image (more blocks, its footer further on): the
    new image is read from its own metadata, never from what lies beyond."""
    dev = devices(4 * MiB, 16 * MiB)
    path = link(devdir, "v", dev)
    vhd.create(path, 12 * MiB)
    vhd.write(path, 0, pat("old0", BLOCK))
    vhd.write(path, 4 * BLOCK, pat("old4", BLOCK))
    old_end = vhd.info(path).physical_size
    vhd.create(path, 8 * MiB)  # a new volume reusing the same extents
    info = vhd.info(path)
    assert info.virtual_size == 8 * MiB and info.allocated_blocks == 0
    assert info.physical_size < old_end
    assert vhd.read(path, 0, 4096) == bytes(4096)
    assert vhd.check(path) == []


def test_growing_past_the_device_is_a_clear_error_and_keeps_the_image(
    devices: Callable[[int, int], str], devdir: Path
) -> None:
    path = link(devdir, "s", devices(0, 5 * MiB))
    vhd.create(path, 16 * MiB)
    vhd.write(path, 0, pat("b0", BLOCK))
    vhd.write(path, BLOCK, pat("b1", 4096))
    with pytest.raises(vhd.NoSpace) as exc:
        vhd.write(path, 2 * BLOCK, pat("b2", 4096))
    assert exc.value.code == "VHD_NO_SPACE"
    assert "grow the device" in str(exc.value)
    assert vhd.check(path) == []
    assert vhd.read(path, 0, BLOCK) == pat("b0", BLOCK)
    assert vhd.read(path, 2 * BLOCK, 4096) == bytes(4096)


def test_chains_of_devices_are_named_in_the_directory_that_names_them(
    devices: Callable[[int, int], str], devdir: Path
) -> None:
    """Locators are relative to the device directory (symlinks to /dev/loopN),
    never to /dev where the nodes are."""
    base = link(devdir, "base", devices(0, 12 * MiB))
    leaf = link(devdir, "leaf", devices(12 * MiB, 12 * MiB))
    vhd.create(base, 8 * MiB)
    vhd.write(base, 0, pat("base0"))
    vhd.write(base, BLOCK, pat("base1"))
    info = vhd.snapshot(base, leaf)
    assert info.parent == base
    assert vhd.chain(leaf) == [leaf, base]
    vhd.write(leaf, BLOCK, pat("leaf1"))
    assert vhd.read(leaf, 0, 4096) == pat("base0")
    assert vhd.read(leaf, BLOCK, 4096) == pat("leaf1")
    assert vhd.check(leaf) == []
    with Image.open(leaf) as img:
        assert img.find_parent() == base
    vhd.set_hidden(base, True)
    assert vhd.info(base).hidden
    assert vhd.coalesce(leaf) == 4096
    assert vhd.read(base, BLOCK, 4096) == pat("leaf1")
    assert vhd.check(leaf) == [] and vhd.check(base) == []


def test_a_writer_killed_mid_allocation_leaves_a_sound_image(
    devices: Callable[[int, int], str], devdir: Path
) -> None:
    """The writer reserves a block and writes its bitmap and data, then dies
    before the BAT points at it; its bytes may also have landed over the tail
    footer.  The image ends where its BAT says: check accepts it, the copy at
    offset 0 stands for a tail written over, and the next writer puts the tail
    back."""
    path = link(devdir, "k", devices(0, 12 * MiB))
    vhd.create(path, 8 * MiB)
    vhd.write(path, 0, pat("kept"))
    before = vhd.info(path).physical_size
    img = Image.open(path, writable=True)
    try:
        base = img.reserve_blocks(1)
        img.put_block(base, 2, 0, memoryview(pat("lost", BLOCK)), None)
        img.sync()  # ... and the process dies here: no BAT entry
    finally:
        os.close(img.fd)
        img.fd = -1
    end = before - 512
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        assert device_tail(lambda n, at: os.pread(fd, n, at), size) == end
        os.pwrite(fd, b"\xee" * 512, end)  # the tail written over as well
        os.fsync(fd)
        with pytest.raises(vhd.Corrupt):
            fmt.Footer.from_bytes(os.pread(fd, 512, end))
    finally:
        os.close(fd)
    assert vhd.check(path) == []
    assert vhd.info(path).physical_size == before
    assert vhd.read(path, 0, 4096) == pat("kept")
    assert vhd.read(path, 2 * BLOCK, 4096) == bytes(4096)
    vhd.write(path, 3 * BLOCK, pat("next"))  # a writable open heals the tail first
    assert vhd.read(path, 3 * BLOCK, 4096) == pat("next")
    assert vhd.check(path) == []


def test_repair_in_a_device(devices: Callable[[int, int], str], devdir: Path) -> None:
    path = link(devdir, "r", devices(0, 12 * MiB))
    vhd.create(path, 8 * MiB)
    vhd.write(path, 0, pat("r0"))
    end = vhd.info(path).physical_size - 512
    fd = os.open(path, os.O_RDWR)
    try:
        good = os.pread(fd, 512, end)
        os.pwrite(fd, b"\xff" * 512, 0)  # the copy at offset 0 damaged
        os.fsync(fd)
    finally:
        os.close(fd)
    assert vhd.check(path) != []
    assert vhd.repair(path) == [
        "restored the footer copy at offset 0 from the tail footer (it was damaged)"
    ]
    assert vhd.check(path) == []
    assert vhd.read(path, 0, 4096) == pat("r0")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 512, 0) == good
    finally:
        os.close(fd)
