"""The ext SR in the kernel tier: a real block device (a virtio disk of the
guest), mkfs.ext4 and the guest kernel's ext4 mount, driven through the real
plugins/ext/EXTSR (guest/scenario_ext.py). The host checks the disk the guest
wrote, with its own kernel's ext4 (read-only loop mount) and the project's
VHD library, while the SR is detached; and after SR.destroy, that the disk
holds no filesystem any more."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import Disk
from patterns import BASE_WRITES, LEAF_WRITES, mismatches
from scenario import MARKS

pytestmark = MARKS

DISK_SIZE = 512 << 20


@contextlib.contextmanager
def mounted_ro(image: Path, at: Path) -> Iterator[Path]:
    """The image's ext4, read-only, with the host's kernel."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        at.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "ro,noload", loop, str(at)], check=True
        )
        try:
            yield at
        finally:
            subprocess.run(["umount", str(at)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_ext_sr_on_a_virtio_disk(run_guest: Any, tmp_path: Path) -> None:
    from smcommon import vhd

    disk = Disk("ext", tmp_path / "ext.img")
    with open(disk.path, "wb") as f:
        f.truncate(DISK_SIZE)
    checked: dict[str, Any] = {}

    def check(name: str, data: dict[str, Any]) -> None:
        mnt = data["mountpoint"]
        with mounted_ro(disk.path, tmp_path / "host-mnt") as at:
            host = {k: at / Path(v).relative_to(mnt) for k, v in data["images"].items()}
            for k, p in host.items():
                assert vhd.check(str(p)) == [], f"{k} image {p}: vhd.check"
            leaf, snap = str(host["leaf"]), str(host["snapshot"])
            assert vhd.info(leaf).parent is not None, (
                "the leaf after a snapshot has a parent"
            )
            assert (
                mismatches(lambda o, n: vhd.read(leaf, o, n), BASE_WRITES + LEAF_WRITES)
                == []
            )
            assert mismatches(lambda o, n: vhd.read(snap, o, n), BASE_WRITES) == []
            checked[name] = sorted(p.name for p in at.iterdir())

    run = run_guest(
        "ext",
        {"device": disk.guest_path, "sr": str(uuid.uuid4())},
        disks=(disk,),
        on_checkpoint=check,
    )
    assert "ext: detached" in checked, "the host never checked the detached SR"
    assert run.result("ext: SR.create (mkfs.ext4)")["fstype"] == "ext4"
    assert run.result("ext: SR.attach (mount)")["mount"][2] == "ext4"
    # SR.destroy wiped the filesystem signature: nothing for the host to find
    probe = subprocess.run(
        ["blkid", "-p", str(disk.path)], check=False, capture_output=True, text=True
    )
    assert probe.returncode == 2, f"blkid -p after SR.destroy: {probe.stdout!r}"
    err = run.result("ext: SR.destroy (umount, wipefs)")["attach_after_destroy"]
    assert err and err[0] == "Backend_error", err
