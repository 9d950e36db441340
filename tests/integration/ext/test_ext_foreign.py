"""Files the SR did not make survive every call that deletes, moves or rewrites
volumes; a valid ``<uuid>.vhd`` whose whole chain lies in the SR is adopted
by SR.scan; everything else is listed in Query.diagnostics as foreign."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
from ext_helpers import BLOCK, SR, MiB, collector_processes

pytestmark = pytest.mark.integration

K4 = 4096


def pat(tag: str) -> bytes:
    unit = (tag.encode() + b"-") * 8
    return (unit * (K4 // len(unit) + 1))[:K4]


# lvmoiscsi: foreign logical volumes, tests/integration/lvmoiscsi/test_lvmoiscsi_sr.py
@pytest.mark.sr_types("ext", "nfs")
def test_destroy_of_an_unrelated_vdi_keeps_someone_elses_disk(sr: SR) -> None:
    """The issue's reproduction: a VHD copied into a ``path`` SR's directory
    was deleted by a VDI.destroy of an unrelated VDI."""
    from smcommon import vhd

    elsewhere = sr.data_dir.parent / "someone-elses-disk.vhd"
    vhd.create(str(elsewhere), 4 * MiB)
    vhd.write(str(elsewhere), 0, pat("theirs"))
    theirs = sr.data_dir / "someone-elses-disk.vhd"
    shutil.copyfile(elsewhere, theirs)
    before = theirs.read_bytes()
    v = sr.create("mine", 4 * MiB)["vdi"]
    sr.ok("VDI.destroy", vdi=v)
    sr.ok("SR.gc")
    assert theirs.read_bytes() == before
    assert "someone-elses-disk.vhd" in sr.ext.ok("Query.diagnostics")


def _foreign_files(sr: SR, tmp: Path) -> dict[str, bytes]:
    """Every kind of file the SR did not make, copied into its directory."""
    from smcommon import vhd

    made: dict[str, bytes] = {}
    ours = {p.name for p in sr.data_dir.iterdir()}
    # a valid VHD named <uuid>.vhd (adopted by the next SR.scan)
    u = str(uuid.uuid4())
    src = tmp / "src-uuid.vhd"
    vhd.create(str(src), 8 * MiB)
    vhd.write(str(src), BLOCK, pat("adopt-me"))
    shutil.copyfile(src, sr.data_dir / f"{u}.vhd")
    # a valid VHD that is not named after a uuid
    src2 = tmp / "plain.vhd"
    vhd.create(str(src2), 4 * MiB)
    vhd.write(str(src2), 0, pat("plain"))
    shutil.copyfile(src2, sr.data_dir / "plain-disk.vhd")
    # a uuid-named differencing VHD whose parent lies outside the SR
    outside = tmp / "outside"
    outside.mkdir()
    vhd.create(str(outside / "base.vhd"), 4 * MiB)
    child = str(uuid.uuid4())
    vhd.snapshot(str(outside / "base.vhd"), str(outside / f"{child}.vhd"))
    shutil.move(outside / f"{child}.vhd", sr.data_dir / f"{child}.vhd")
    # a text file, and a text file with the VHD suffix
    (sr.data_dir / "notes.txt").write_text("not a disk\n")
    (sr.data_dir / "README.vhd").write_text("not a disk either\n")
    # a half-written (half-copied) uuid-named VHD
    half = str(uuid.uuid4())
    data = src.read_bytes()
    (sr.data_dir / f"{half}.vhd").write_bytes(data[: len(data) // 2])
    for p in sr.data_dir.iterdir():
        if p.is_file() and p.name not in ours:
            made[p.name] = p.read_bytes()
    made["__adoptable__"] = u.encode()
    return made


@pytest.mark.sr_types("ext", "nfs")  # files in the SR directory (lvmoiscsi: LVs, above)
def test_foreign_files_survive_destroy_gc_and_are_reported(
    sr: SR, tmp_path: Path
) -> None:
    from smcommon import vhd

    a = sr.create("a", 8 * MiB)["vdi"]
    sr.write(a, {0: pat("a0")})
    s = sr.snapshot(a)["vdi"]
    sr.write(a, {BLOCK: pat("a1")})
    made = _foreign_files(sr, tmp_path)
    adoptable = made.pop("__adoptable__").decode()
    source = vhd.read(str(tmp_path / "src-uuid.vhd"), 0, 8 * MiB)
    assert len(made) == 6
    sr.ok("VDI.destroy", vdi=s)
    sr.ok("SR.gc")
    for name, data in made.items():
        p = sr.data_dir / name
        assert p.exists(), f"{name} was deleted"
        assert p.read_bytes() == data, f"{name} was rewritten"
    assert sr.read(a, [(0, K4), (BLOCK, K4)]) == [pat("a0"), pat("a1")]
    diag = sr.ext.ok("Query.diagnostics")
    for name in made:
        if name.split(".")[0] != adoptable:
            assert name in diag, f"{name} not listed as foreign:\n{diag}"
    assert "foreign" in diag

    # a collector killed (kill -9) as soon as it starts, then SR.gc
    s2 = sr.snapshot(a)["vdi"]
    sr.write(a, {b * BLOCK: pat(f"k{b}") for b in range(4)})
    sr.ok("VDI.destroy", vdi=s2)
    deadline = time.monotonic() + 30
    killed = 0
    while time.monotonic() < deadline and not killed:
        for p in collector_processes(sr.ext.root):
            p.kill()
            killed += 1
    assert killed, "the collector was never seen running"
    sr.ok("SR.gc")
    for name, data in made.items():
        assert (sr.data_dir / name).read_bytes() == data, f"{name} was touched"
    assert sr.read(a, [(b * BLOCK, K4) for b in range(4)]) == [
        pat(f"k{b}") for b in range(4)
    ]

    # the next SR.scan adopts the valid uuid-named VHD, and only it
    scan = sr.scan()
    assert adoptable in scan
    assert set(scan) == {a, adoptable}
    assert sr.read(adoptable, [(0, 8 * MiB)]) == [source]
    assert int(scan[adoptable]["virtual_size"]) == 8 * MiB
    # adopted: an ordinary VDI from now on
    snap = sr.snapshot(adoptable)["vdi"]
    sr.write(adoptable, {0: pat("new")})
    assert sr.read(snap, [(BLOCK, K4), (0, K4)]) == [pat("adopt-me"), b"\0" * K4]
    sr.ok("VDI.destroy", vdi=snap)
    sr.ok("SR.gc")
    for name, data in made.items():
        if name.split(".")[0] == adoptable:
            continue
        assert (sr.data_dir / name).read_bytes() == data, name
    diag = sr.ext.ok("Query.diagnostics")
    assert (
        "half" in diag.lower()
        or "corrupt" in diag.lower()
        or "incomplete" in diag.lower()
    )
    assert "outside" in diag.lower()
