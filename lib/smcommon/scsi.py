"""SCSI identities: which block device is the LUN named by a SCSI id.

A LUN is always found by its SCSI id (udev's ``scsi_id -g -u``: the device
identification VPD page's best designator, e.g. ``36000...`` for an NAA
designator), never by guessing ``/dev/sdX`` from an order of discovery.
``find_disk`` asks ``scsi_id`` (through the one runner) about each candidate
disk, after the cheaper sysfs ``device/wwid`` when it names an NAA or EUI id.
``best_id`` computes the same id from raw VPD page 0x83 designators (the
userspace initiator reads them over iSCSI itself).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

from smcommon.errors import BackendError, CommandError, CommandTimeout
from smcommon.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

SCSI_ID_PATHS = ("/lib/udev/scsi_id", "/usr/lib/udev/scsi_id")
SCSI_ID_TIMEOUT = 10.0

# VPD page 0x83 designator types and code sets
DESIGNATOR_VENDOR = 0
DESIGNATOR_T10 = 1
DESIGNATOR_EUI64 = 2
DESIGNATOR_NAA = 3
CODE_BINARY = 1
CODE_ASCII = 2
ASSOCIATION_LUN = 0


@record(frozen=True)
class Designator:
    type: int
    code_set: int
    association: int
    value: bytes


@record(frozen=True)
class DiskInfo:
    """What sysfs says of a SCSI disk."""

    name: str
    vendor: str = ""
    model: str = ""
    size: int = 0
    wwid: str = ""


def scsi_id_binary() -> str:
    for p in SCSI_ID_PATHS:
        if os.access(p, os.X_OK):
            return p
    return SCSI_ID_PATHS[0]


def scsi_id(device: str, runner: Callable[..., Any] | None = None,
            binary: str | None = None) -> str | None:
    """udev's SCSI id of ``device``; None when it has none (scsi_id exits 1)."""
    if runner is None:
        from smcommon.runner import run

        runner = run
    argv = [binary or scsi_id_binary(), "-g", "-u", "-d", device]
    try:
        res = runner(argv, timeout=SCSI_ID_TIMEOUT, ok_codes=(0, 1))
    except CommandTimeout:
        raise BackendError("SCSI_ID_TIMEOUT", [f"scsi_id {device} did not answer"]) from None
    except CommandError as e:
        raise BackendError("SCSI_ID_FAILED", [f"scsi_id {device}: exit {e.rc}"]) from None
    text = res.out.strip()
    return text if res.rc == 0 and text else None


def wwid_to_id(wwid: str) -> str | None:
    """sysfs ``device/wwid`` (``naa.6000...``, ``eui.00...``) as scsi_id prints it."""
    kind, _, value = wwid.strip().partition(".")
    if not value:
        return None
    if kind == "naa":
        return "3" + value.lower()
    if kind == "eui":
        return "2" + value.lower()
    return None


def read_disk(name: str, sysfs: str = "/sys") -> DiskInfo:
    """Vendor, model, size and wwid of ``/sys/block/<name>`` (missing parts empty)."""
    base = os.path.join(sysfs, "block", name)

    def attr(rel: str) -> str:
        try:
            with open(os.path.join(base, rel), encoding="latin-1") as f:
                return f.read().rstrip("\n")
        except OSError:
            return ""

    try:
        sectors = int(attr("size") or 0)
    except ValueError:
        sectors = 0
    return DiskInfo(
        name=name,
        vendor=attr("device/vendor").strip(),
        model=attr("device/model").strip(),
        size=sectors * 512,
        wwid=attr("device/wwid").strip(),
    )


def find_disk(
    wanted: str,
    names: Sequence[str],
    runner: Callable[..., Any] | None = None,
    sysfs: str = "/sys",
    dev: str = "/dev",
) -> str | None:
    """The ``/dev/<name>`` among ``names`` whose SCSI id is ``wanted`` (None if none)."""
    wanted = wanted.strip().lower()
    for name in names:
        if wwid_to_id(read_disk(name, sysfs).wwid) == wanted:
            return os.path.join(dev, name)
    for name in names:
        got = scsi_id(os.path.join(dev, name), runner)
        if got is not None and got.lower() == wanted:
            return os.path.join(dev, name)
    return None


# --- the id from raw VPD page 0x83 -----------------------------------------------------


def parse_designators(page: bytes) -> list[Designator]:
    """The designators of a device identification VPD page (0x83)."""
    if len(page) < 4 or page[1] != 0x83:
        raise ValueError("not a device identification VPD page")
    end = min(len(page), 4 + int.from_bytes(page[2:4], "big"))
    out = []
    pos = 4
    while pos + 4 <= end:
        code_set = page[pos] & 0x0F
        association = (page[pos + 1] >> 4) & 0x03
        dtype = page[pos + 1] & 0x0F
        length = page[pos + 3]
        value = page[pos + 4 : pos + 4 + length]
        if len(value) < length:
            break
        out.append(Designator(dtype, code_set, association, bytes(value)))
        pos += 4 + length
    return out


def best_id(designators: Iterable[Designator]) -> str | None:
    """The id udev's scsi_id -g -u prints: NAA (IEEE registered extended first),
    then EUI-64, then T10 vendor id; designators of the LUN only."""
    lun = [d for d in designators if d.association == ASSOCIATION_LUN and d.value]

    def naa_rank(d: Designator) -> int:
        naa = d.value[0] >> 4
        return {6: 0, 5: 1, 2: 2, 3: 3}.get(naa, 4)

    naas = sorted((d for d in lun if d.type == DESIGNATOR_NAA and d.code_set == CODE_BINARY),
                  key=naa_rank)
    if naas:
        return "3" + naas[0].value.hex()
    for d in lun:
        if d.type == DESIGNATOR_EUI64 and d.code_set == CODE_BINARY:
            return "2" + d.value.hex()
    for d in lun:
        if d.type == DESIGNATOR_T10:
            text = d.value.decode("latin-1").strip()
            return "1" + "_".join(text.split())
    return None
