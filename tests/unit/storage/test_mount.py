"""smcommon.mount against captured real outputs of mount/umount and
/proc/self/mounts lines (tests/data/captures: this kernel cannot mount NFS,
and ext4 mounts need root): the argv built, and the errors mapped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captures import FakeRunner, load
from smcommon import mount
from smcommon.errors import to_wire

LV = "/dev/VG_XenStorage-f140ab92-e742-4921-aff5-d7ad76cd5e9e/LV-86bb85ed-9dba-426a-9868-2a47e6a251f6"


def test_mount_ext4_argv_is_the_captured_one() -> None:
    cap = load("mount", "mount_ext4")
    run = FakeRunner(cap)
    mount.mount(LV, "/mnt/ext", fstype="ext4", runner=run)
    assert run.calls == [cap.argv]


def test_mount_failures_carry_mounts_own_words() -> None:
    for case, words in [
        ("mount_ext4_already_mounted", "already mounted on /mnt/ext"),
        ("mount_ext4_on_unformatted_lv", "wrong fs type, bad option, bad superblock"),
    ]:
        run = FakeRunner(load("mount", case))
        with pytest.raises(mount.MountFailed) as info:
            mount.mount(LV, "/mnt/ext", fstype="ext4", runner=run)
        wire = to_wire(info.value)
        assert wire[:2] == ["Backend_error", "MOUNT_FAILED"]
        assert "/mnt/ext" in wire[2]
        assert words in wire[3]
        # util-linux's hint about dmesg is not the reason
        assert "dmesg(1)" not in " ".join(wire)


def test_mount_timeout_is_a_mount_failure() -> None:
    # showmount against a blackholed server was killed after 100 s: any
    # command the runner kills reads the same to mount()
    run = FakeRunner(load("showmount", "e_server_blackholed"))
    with pytest.raises(mount.MountFailed) as info:
        mount.mount("10.251.77.2:/exports/sr1", "/mnt/x", fstype="nfs", runner=run, timeout=7)
    assert "did not finish within 7s" in str(info.value)


def test_umount() -> None:
    cap = load("mount", "umount_ext4")
    run = FakeRunner(cap)
    assert mount.umount("/mnt/ext", runner=run) is True
    assert run.calls == [cap.argv]
    # not mounted: nothing to do, not an error
    run = FakeRunner(load("mount", "umount_not_mounted"))
    assert mount.umount("/mnt/ext", runner=run) is False
    run = FakeRunner(load("mount_nfs", "umount_not_mounted"))
    assert mount.umount("/mnt/x", runner=run) is False
    # never a lazy or forced unmount
    assert all("-l" not in c and "-f" not in c for c in run.calls)


def test_proc_mounts_lines() -> None:
    ext = mount.parse_mounts(load("mount", "proc_mounts_ext4_line").stdout)
    assert ext == [
        mount.MountEntry(
            "/dev/mapper/VG_XenStorage--f140ab92--e742--4921--aff5--d7ad76cd5e9e-LV--86bb85ed--9dba--426a--9868--2a47e6a251f6",
            "/mnt/ext",
            "ext4",
            ("rw", "relatime", "stripe=4"),
        )
    ]
    (v3,) = mount.parse_mounts(load("mount_nfs", "v3_proc_mounts_line").stdout)
    assert (v3.source, v3.target, v3.fstype) == ("10.251.77.2:/exports/sr1", "/mnt/x", "nfs")
    assert v3.option("vers") == "3" and v3.option("soft") == ""
    assert v3.option("local_lock") == "none" and v3.option("hard") is None
    (nolock,) = mount.parse_mounts(load("mount_nfs", "v3_nolock_proc_mounts_line").stdout)
    assert nolock.option("nolock") == "" and nolock.option("local_lock") == "all"
    for case, vers in [("v41_proc_mounts_line", "4.1"), ("v42_proc_mounts_line", "4.2")]:
        (e,) = mount.parse_mounts(load("mount_nfs", case).stdout)
        assert e.fstype == "nfs4" and e.option("vers") == vers
        assert mount.mounted_at("/mnt/x", [e]) == e
    assert mount.mounted_at("/mnt/y", [v3]) is None


def test_escapes_and_stacked_mounts() -> None:
    text = (
        "/dev/loop1 /run/a\\040b ext4 rw 0 0\n"
        "garbage\n"
        "/dev/loop2 /run/a\\040b ext4 rw 0 0\n"
        "/dev/loop3 /run/back\\134slash\\011tab ext4 rw 0 0\n"
    )
    table = mount.parse_mounts(text)
    assert [e.target for e in table] == ["/run/a b", "/run/a b", "/run/back\\slash\ttab"]
    top = mount.mounted_at("/run/a b", table)
    assert top is not None and top.source == "/dev/loop2"
    assert mount.unescape("x\\09y\\") == "x\\09y\\"


def test_bind_argv() -> None:
    cap = load("mount", "umount_ext4")  # any successful empty answer
    run = FakeRunner(cap)
    mount.bind("/srv/export/sr", "/run/sm/sr-mount/sr", runner=run)
    assert run.calls == [["mount", "--bind", "/srv/export/sr", "/run/sm/sr-mount/sr"]]
