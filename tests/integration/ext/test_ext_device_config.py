"""device_config safety of the ext type, through the real EXTSR executable.

- ``path``: only under the host's SR roots (``SM_SR_PATHS``), never through a
  symlink out of them; a refused path is not created.
- ``device``: SR.create refuses a real loop device that is mounted, is an LVM
  physical volume, or holds a filesystem or a partition table (found with
  lsblk and wipefs --no-act), unless ``force=true`` (never when mounted); the
  device is untouched afterwards (a checksum of its first MiBs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ext_helpers import Ext, SrFactory

pytestmark = [pytest.mark.integration, pytest.mark.sr_types("ext")]

HEAD = 8 << 20  # the bytes compared before and after a refusal


def _head(dev: str) -> str:
    with open(dev, "rb") as f:
        return hashlib.sha256(f.read(HEAD)).hexdigest()


def _create(ext: Ext, config: dict[str, str]) -> tuple[str, list[str]]:
    sr = str(uuid.uuid4())
    r = ext.call("SR.create", sr=sr, device_config=config, physical_size="0")
    return sr, r.error


def test_path_srs_only_under_the_roots(ext: Ext, tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    (roots / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    ext.env["SM_SR_PATHS"] = f"{roots / 'a'}:{roots / 'b'}"
    (roots / "a" / "escape").symlink_to(outside)
    for path, words in (
        (str(outside / "sr1"), "is not under an SR root"),
        ("/etc/sm-sr-test", "is not under an SR root"),
        (str(roots / "a"), "is an SR root itself"),
        (str(roots / "a" / "escape" / "sr2"), f"(resolved: {outside / 'sr2'})"),
        (str(roots / "a" / ".." / "a2"), "must not hold '..'"),
    ):
        _sr, err = _create(ext, {"path": path})
        assert err[:2] == ["Backend_error", "PATH_NOT_ALLOWED"], (path, err)
        assert words in err[2] and str(roots / "a") in err[2] + path, (path, err)
    assert not (outside / "sr1").exists() and not (outside / "sr2").exists()
    assert not Path("/etc/sm-sr-test").exists()
    # under a root (one that does not exist yet, too): made, attached
    made = []
    for path in (roots / "a" / "sr3", roots / "b" / "x" / "sr4"):
        sr, err = _create(ext, {"path": str(path)})
        assert not err, err
        ext.ok("SR.attach", sr=sr, device_config={"path": str(path)})
        ext.ok("SR.detach", sr=sr)
        made.append(sr)
    # a symlink that stays inside a root is followed
    (roots / "a" / "inside").symlink_to(roots / "a" / "sr3")
    ext.ok("SR.attach", sr=made[0], device_config={"path": str(roots / "a" / "inside")})
    ext.ok("SR.detach", sr=made[0])


def test_path_srs_never_in_the_hosts_own_directories(ext: Ext) -> None:
    """The state directory is a default root (/var/lib/sm): SRs may live in
    it, but never as it, nor in its registry, spool or dispatcher entries,
    nor in the run, log or configuration directories."""
    state = ext.root / "var" / "lib" / "sm"
    ext.env["SM_SR_PATHS"] = f"{state}:{ext.root}"
    for path in (
        state / "sr",  # the registry of attached SRs
        state / "import" / "x",
        state / "dispatcher",
        ext.root / "run" / "sm" / "x",
        ext.root / "etc" / "sm" / "x",
        ext.root / "var" / "log" / "sm",
    ):
        _sr, err = _create(ext, {"path": str(path)})
        assert err[:2] == ["Backend_error", "PATH_NOT_ALLOWED"], (path, err)
        assert "the host's own directory" in err[2], (path, err)
    assert not (state / "import" / "x").exists() and not (ext.root / "etc" / "sm" / "x").exists()
    sr, err = _create(ext, {"path": str(state / "srs" / "one")})
    assert not err, err
    ext.ok("SR.attach", sr=sr, device_config={"path": str(state / "srs" / "one")})
    ext.ok("SR.detach", sr=sr)


@pytest.fixture
def device(make_sr: SrFactory) -> Iterator[str]:
    dev = make_sr.loop_device("64M")
    yield dev


def test_a_mounted_device_is_refused_even_forced(
    ext: Ext, device: str, tmp_path: Path
) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True)
    try:
        (mnt / "data").write_text("precious\n")
        os.sync()
        before = _head(device)
        for config in ({"device": device}, {"device": device, "force": "true"}):
            _sr, err = _create(ext, config)
            assert err[:2] == ["Backend_error", "DEVICE_IN_USE"], err
            assert f"is mounted at {mnt}" in err[2], err
        assert _head(device) == before
        assert (mnt / "data").read_text() == "precious\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _lvm_env(tmp_path: Path) -> dict[str, str]:
    """A private lvm.conf: no activation (no device-mapper here), only loop devices."""
    d = tmp_path / "lvm"
    d.mkdir()
    (d / "lvm.conf").write_text(
        f'global {{ activation=0 use_lvmpolld=0 event_activation=0 locking_dir="{d}" }}\n'
        "activation { udev_sync=0 udev_rules=0 monitoring=0 verify_udev_operations=0 }\n"
        'devices { obtain_device_list_from_udev=0 use_devicesfile=0 '
        'global_filter=["a|^/dev/loop[0-9]+$|","r|.*|"] }\n'
        f'backup {{ backup=0 archive=0 backup_dir="{d}" }}\n'
    )
    return dict(os.environ, LVM_SYSTEM_DIR=str(d), LVM_SUPPRESS_FD_WARNINGS="1")


@pytest.mark.parametrize("holds", ["ext4", "swap", "lvm-pv", "dos-label", "gpt-label"])
def test_a_device_that_holds_something_is_refused_untouched(
    ext: Ext, device: str, holds: str, tmp_path: Path
) -> None:
    maker = {
        "ext4": (["mkfs.ext4", "-q", "-F", "-L", "keepme", device], None, "ext4"),
        "swap": (["mkswap", device], None, "swap"),
        "lvm-pv": (["pvcreate", "-q", device], _lvm_env(tmp_path), "LVM physical volume"),
        "dos-label": (["sfdisk", "-q", device], None, "dos partition table"),
        "gpt-label": (["sfdisk", "-q", device], None, "gpt partition table"),
    }
    argv, env, words = maker[holds]
    table = {"dos-label": "label: dos\n,32M\n", "gpt-label": "label: gpt\n,32M\n"}.get(holds)
    subprocess.run(argv, input=table, text=True, env=env, check=True, capture_output=True)
    before = _head(device)
    sr, err = _create(ext, {"device": device})
    assert err[:2] == ["Backend_error", "DEVICE_NOT_EMPTY"], err
    assert words in err[2] and "force=true" in err[2], err
    assert _head(device) == before
    # forced, it is formatted (and the SR works)
    sr, err = _create(ext, {"device": device, "force": "true"})
    assert not err, err
    ext.ok("SR.attach", sr=sr, device_config={"device": device})
    ext.ok("SR.detach", sr=sr)


def test_a_blank_device_needs_no_force(ext: Ext, device: str) -> None:
    sr, err = _create(ext, {"device": device})
    assert not err, err
    # an SR's own device is not "in use" when attached by it, nor refused again
    ext.ok("SR.attach", sr=sr, device_config={"device": device})
    ext.ok("SR.detach", sr=sr)
    ext.ok("SR.attach", sr=sr, device_config={"device": device})
    ext.ok("SR.detach", sr=sr)
