"""A full filesystem while VDI metadata is saved: a clear Backend_error that
names the SR and the step, never INTERNAL_ERROR, and nothing half-written.

The SR is a ``path`` SR on a small tmpfs or a small ext4 (made with no
reserved blocks, so root fills it too) mounted for the test (root only).
The filesystem is filled, then a little room (0 to 32 KiB) is given back
before each call."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ext_helpers import SR, Ext, MiB, vinfo

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.sr_types("ext")]


@contextlib.contextmanager
def small_fs(kind: str, where: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mnt = where / f"fs-{kind}"
    mnt.mkdir()
    loop = None
    if kind == "tmpfs":
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True
        )
    else:
        if not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
            pytest.skip("mkfs.ext4 or losetup missing")
        img = where / "small-ext4.img"
        subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)
        loop = subprocess.run(
            ["losetup", "--find", "--show", str(img)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if not loop:
            pytest.skip("no loop device")
        subprocess.run(["mount", "-t", "ext4", loop, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem, then free ``leave`` bytes (rounded to the fs block)."""
    filler = mnt / "filler"
    with open(filler, "ab") as f:
        chunk = b"\xaa" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT), e
        with contextlib.suppress(OSError):
            f.flush()
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    while True:  # the last partial blocks too
        try:
            with open(filler, "ab") as f:
                f.write(b"\xaa" * 512)
        except OSError:
            break
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def files_of(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "filler":
            out[str(p.relative_to(d))] = p.read_bytes()
    return out


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_full_filesystem_gives_a_clear_error(
    ext: Ext, tmp_path: Path, kind: str
) -> None:
    with small_fs(kind, tmp_path) as mnt:
        d = mnt / "sr"
        d.mkdir()
        sr_uuid = str(uuid.uuid4())
        ext.ok(
            "SR.create", sr=sr_uuid, device_config={"path": str(d)}, physical_size="0"
        )
        ext.ok("SR.attach", sr=sr_uuid, device_config={"path": str(d)})
        sr = SR(ext, sr_uuid, "path", d, {"path": str(d)})
        try:
            v = sr.create("d0", 4 * MiB)["vdi"]
            failures = 0
            for leave in (0, 4096, 8192, 16384, 32768):
                filler = fill(mnt, leave)
                before = files_of(d)
                cid = f"content-{leave}"
                r = ext.call("VDI.set_content_id", sr=sr_uuid, vdi=v, content_id=cid)
                if r.ok:
                    assert sr.ok("VDI.stat", vdi=v)["content_id"] == cid
                else:
                    failures += 1
                    assert r.error[:2] == ["Backend_error", "SR_FULL"], r.describe()
                    text = " ".join(r.error)
                    assert sr_uuid in text and "content_id" in text, text
                    assert "Traceback" not in r.stderr
                    # nothing half-written: every file as it was
                    assert files_of(d) == before
                before = files_of(d)
                r = ext.call(
                    "VDI.create", sr=sr_uuid, vdi_info=vinfo(f"n{leave}", 4 * MiB)
                )
                if not r.ok:
                    failures += 1
                    assert r.error[0] == "Backend_error", r.describe()
                    assert r.error[1] == "SR_FULL", r.describe()
                    text = " ".join(r.error)
                    assert sr_uuid in text and ("VDI" in text or "volume" in text), text
                    assert files_of(d) == before, "a failed VDI.create left files"
                    assert set(sr.scan()) >= {v}
                filler.unlink()
            assert failures >= 2, "the filesystem never filled up"
            # with room again, everything works and nothing is left over
            assert sr.ok("VDI.stat", vdi=v)["vdi"] == v
            sr.ok("VDI.set_content_id", vdi=v, content_id="after")
            w = sr.create("after", 4 * MiB)["vdi"]
            sr.ok("VDI.destroy", vdi=w)
            sr.ok("SR.gc")
            sr.assert_consistent(after_gc=True)
        finally:
            ext.call("SR.detach", sr=sr_uuid)
