"""smcommon.scsi: a LUN found by its SCSI id, from real scsi_id outputs and sysfs
values (tests/data/captures, taken on a full kernel), never by /dev/sdX order."""

from __future__ import annotations

from pathlib import Path

import pytest
from replay import Replay, load
from smcommon.scsi import (
    Designator,
    best_id,
    find_disk,
    parse_designators,
    read_disk,
    scsi_id,
    wwid_to_id,
)

LUN1_ID = "360000000000000000e00000000010001"
LUN2_ID = "360000000000000000e00000000010002"


def fake_sysfs(root: Path, with_wwid: bool = True) -> Path:
    """/sys/block/sd{a,b} from the captured values (lun1 = sda, lun2 = sdb)."""
    for lun, disk in (("lun1", "sda"), ("lun2", "sdb")):
        dev = root / "block" / disk / "device"
        dev.mkdir(parents=True)
        for attr in ("vendor", "model", "rev", "wwid", "state", "type", "scsi_level"):
            if attr == "wwid" and not with_wwid:
                continue
            (dev / attr).write_text(load("sysfs", f"{lun}_{attr}").stdout)
        (root / "block" / disk / "size").write_text(load("sysfs", f"{lun}_size_sectors").stdout)
    return root


def test_scsi_id_of_a_disk_and_of_devices_without_one() -> None:
    replay = Replay([
        (["/lib/udev/scsi_id", "-g", "-u", "-d", "/dev/sda"], load("scsi_id", "lun1_g_u_d")),
        (["/lib/udev/scsi_id", "-g", "-u", "-d", "/dev/sdz"],
         load("scsi_id", "nonexistent_device")),
        (["/lib/udev/scsi_id", "-g", "-u", "-d", "/dev/vda"],
         load("scsi_id", "virtio_disk_no_id")),
    ])
    assert scsi_id("/dev/sda", replay, "/lib/udev/scsi_id") == LUN1_ID
    assert scsi_id("/dev/sdz", replay, "/lib/udev/scsi_id") is None  # exit 1, no output
    assert scsi_id("/dev/vda", replay, "/lib/udev/scsi_id") is None
    replay.done()


def test_sysfs_wwid_names_the_same_id_as_scsi_id() -> None:
    assert wwid_to_id(load("sysfs", "lun1_wwid").stdout) == load("scsi_id", "lun1_g_u_d").stdout.strip()
    assert wwid_to_id(load("sysfs", "lun2_wwid").stdout) == LUN2_ID
    assert wwid_to_id("t10.IET 00010001") is None


def test_read_disk(tmp_path: Path) -> None:
    info = read_disk("sdb", str(fake_sysfs(tmp_path)))
    assert (info.vendor, info.model) == ("IET", "VIRTUAL-DISK")
    assert info.size == 524288 * 512
    assert info.wwid == "naa.60000000000000000e00000000010002"


def test_find_disk_by_sysfs_wwid(tmp_path: Path) -> None:
    def no_commands(argv: list[str], **kw: object) -> None:
        raise AssertionError(f"no command expected: {argv}")

    sysfs = str(fake_sysfs(tmp_path))
    assert find_disk(LUN2_ID, ["sda", "sdb"], no_commands, sysfs) == "/dev/sdb"
    assert find_disk(LUN1_ID, ["sdb", "sda"], no_commands, sysfs) == "/dev/sda"


def test_find_disk_asks_scsi_id_when_sysfs_has_no_wwid(tmp_path: Path) -> None:
    from smcommon import scsi

    sysfs = str(fake_sysfs(tmp_path, with_wwid=False))
    binary = scsi.scsi_id_binary()
    replay = Replay([
        ([binary, "-g", "-u", "-d", "/dev/sda"], load("scsi_id", "lun1_g_u_d")),
        ([binary, "-g", "-u", "-d", "/dev/sdb"], load("scsi_id", "lun2_g_u_d")),
    ])
    assert find_disk(LUN2_ID, ["sda", "sdb"], replay, sysfs) == "/dev/sdb"
    replay.done()
    replay = Replay([
        ([binary, "-g", "-u", "-d", "/dev/sda"], load("scsi_id", "lun1_g_u_d")),
    ])
    assert find_disk("3600000000000000000000000000000ff", ["sda"], replay, sysfs) is None


def tgt_page83(lun: int) -> bytes:
    """Device identification VPD page as tgt builds it: NAA 6 (16 bytes), NAA 3
    (8 bytes), T10 vendor id (ASCII)."""
    naa6 = bytes.fromhex(f"60000000000000000e000000000100{lun:02x}")
    naa3 = bytes.fromhex("3000000000000000")
    t10 = b"IET     " + f"000100{lun:02x}".encode()
    body = b""
    for code_set, dtype, value in ((1, 3, naa6), (1, 3, naa3), (2, 1, t10)):
        body += bytes([code_set, dtype, 0, len(value)]) + value
    return bytes([0, 0x83]) + len(body).to_bytes(2, "big") + body


def test_the_id_from_raw_vpd_matches_udev() -> None:
    """The userspace initiator computes the id from page 0x83 itself: the same
    string scsi_id printed for the same tgt LUN on a real kernel."""
    assert best_id(parse_designators(tgt_page83(1))) == load("scsi_id", "lun1_g_u_d").stdout.strip()
    assert best_id(parse_designators(tgt_page83(2))) == LUN2_ID


def test_best_id_falls_back_to_eui_then_t10() -> None:
    eui = Designator(2, 1, 0, bytes.fromhex("0011223344556677"))
    t10 = Designator(1, 2, 0, b"VENDOR  SERIAL  01")
    port = Designator(3, 1, 1, bytes.fromhex("6000"))  # a port's id, not the LUN's
    assert best_id([t10, eui, port]) == "20011223344556677"
    assert best_id([t10]) == "1VENDOR_SERIAL_01"
    assert best_id([port]) is None
    with pytest.raises(ValueError):
        parse_designators(b"\x00\x80\x00\x00")
