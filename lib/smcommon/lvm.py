"""LVM2 (``lvm``'s commands), through the one runner, with a private configuration.

This module owns every lvm command line: it builds argv lists, runs them
through ``smcommon.runner`` with a timeout, parses the JSON report format
(``--reportformat json --units b --nosuffix``) into typed records, and maps
failures to ``LvmError`` (a ``Backend_error`` with a stable code).

Every command runs with ``LVM_SYSTEM_DIR`` pointing at a private ``lvm.conf``
(``LvmConfig``) whose device filter admits only the SR's LUN: lvm never
scans, reads or locks another disk of the host, and the host's own lvm.conf
(devices file, filters, lvmetad, event activation) plays no part.  With
``activation=False`` (hosts without device-mapper) the configuration turns
activation off: metadata operations work, nothing is mapped.

New logical volumes are created inactive and not zeroed (``-an -Zn``): the
caller activates what it uses (reference-counted, ``smcommon.lvhd``).

Exit codes are lvm2's (tools/errors.h): most failures exit ECMD_FAILED (5);
the message on stderr says which (see ``_classify``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from smcommon.errors import BackendError, CommandError, CommandTimeout
from smcommon.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

# lvm2's exit codes (tools/errors.h)
ECMD_PROCESSED = 0  # lvm maps its internal ECMD_PROCESSED (1) to exit 0
ENO_SUCH_CMD = 2
EINVALID_CMD_LINE = 3
EINIT_FAILED = 4
ECMD_FAILED = 5

LVM_TIMEOUT = 60.0
MiB = 1024 * 1024
VG_PREFIX = "VG_XenStorage-"

LV_FIELDS = "lv_name,lv_size,lv_attr,lv_tags,seg_start_pe,seg_size_pe,devices"
REPORT_FIELDS = LV_FIELDS + ",vg_name,vg_size,vg_free,vg_extent_size,vg_tags"
VG_FIELDS = "vg_name,vg_size,vg_free,vg_extent_size,vg_tags,pv_count,lv_count"
PV_FIELDS = "pv_name,vg_name,pv_size,pv_free,pe_start,pv_pe_count"
_DEVICES_RE = re.compile(r"^(?P<pv>[^()]+)\((?P<pe>\d+)\)$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_+.\-/=!:&#]{1,1024}$")


class LvmError(BackendError):
    """An lvm command failed; ``code`` says how (LVM_VG_NOT_FOUND, LVM_NO_SPACE ...)."""

    def __init__(self, code: str, what: str, detail: str = "") -> None:
        super().__init__(code, [what, detail] if detail else [what])
        self.what = what


@record(frozen=True)
class Segment:
    """Extents ``lv_start``.. of an LV lie on ``pv`` from extent ``pv_start``."""

    lv_start: int
    count: int
    pv: str
    pv_start: int


@record(frozen=True)
class Lv:
    name: str
    size: int
    attr: str = ""
    tags: tuple[str, ...] = ()
    segments: tuple[Segment, ...] = ()

    @property
    def active(self) -> bool:
        """Mapped by device-mapper (attr position 5 is ``a``)."""
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def read_only(self) -> bool:
        return len(self.attr) > 1 and self.attr[1] == "r"


@record(frozen=True)
class Vg:
    name: str
    size: int
    free: int
    extent_size: int
    tags: tuple[str, ...] = ()
    pv_count: int = 0
    lv_count: int = 0


@record(frozen=True)
class Pv:
    name: str
    vg: str
    size: int
    free: int
    pe_start: int
    pe_count: int = 0


@record
class LvmConfig:
    """A private lvm configuration: ``<dir>/lvm.conf`` plus lock and backup dirs.

    ``devices`` are the only block devices lvm may look at (exact paths);
    ``activation`` False turns device-mapper off (metadata only).
    """

    dir: Path
    devices: Sequence[str]
    activation: bool = True
    udev: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        accept = ", ".join(f'"a|^{re.escape(d)}$|"' for d in self.devices)
        filt = f'[ {accept}, "r|.*|" ]' if accept else '[ "r|.*|" ]'
        udev = 1 if self.udev else 0
        return (
            "# written by smcommon.lvm: the private configuration of one SR\n"
            "global {\n"
            f"    activation = {1 if self.activation else 0}\n"
            "    use_lvmpolld = 0\n"
            "    event_activation = 0\n"
            f'    locking_dir = "{self.dir / "lock"}"\n'
            "}\n"
            "activation {\n"
            f"    udev_sync = {udev}\n"
            f"    udev_rules = {udev}\n"
            "    monitoring = 0\n"
            "    verify_udev_operations = 0\n"
            "}\n"
            "devices {\n"
            f"    obtain_device_list_from_udev = {udev}\n"
            "    use_devicesfile = 0\n"
            "    write_cache_state = 0\n"
            f"    global_filter = {filt}\n"
            f"    filter = {filt}\n"
            "}\n"
            "backup {\n"
            "    backup = 1\n"
            f'    backup_dir = "{self.dir / "backup"}"\n'
            "    archive = 0\n"
            "}\n"
        )

    def write(self) -> None:
        """(Re)write the configuration if it changed; directories 0700."""
        for d in (self.dir, self.dir / "lock", self.dir / "backup"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir / "lvm.conf"
        text = self.text()
        try:
            if path.read_text() == text:
                return
        except OSError:
            pass
        tmp = path.with_name(f".lvm.conf.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "HOME", "SM_ROOT")
        }
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(
            LVM_SYSTEM_DIR=str(self.dir),
            LVM_SUPPRESS_FD_WARNINGS="1",
            LC_ALL="C",
            **self.extra_env,
        )
        return env


def _size_arg(size: int) -> str:
    """``-L`` in MiB (every size here is a whole number of extents)."""
    if size <= 0 or size % MiB:
        raise ValueError(f"LV size {size} is not a positive number of MiB")
    return f"{size // MiB}M"


def check_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise ValueError(f"not a valid LVM tag: {tag!r}")
    return tag


def _classify(err: str) -> str:
    e = err.lower()
    if "insufficient free space" in e or "insufficient suitable" in e:
        return "LVM_NO_SPACE"
    if re.search(r'volume group "[^"]*" not found', e) or "cannot process volume group" in e:
        return "LVM_VG_NOT_FOUND"
    if "failed to find logical volume" in e or "logical volume" in e and "not found" in e:
        return "LVM_LV_NOT_FOUND"
    if "already exists" in e:
        return "LVM_EXISTS"
    if "in use" in e or "is open" in e:
        return "LVM_IN_USE"
    if "not found" in e and ("device" in e or "pv" in e):
        return "LVM_PV_NOT_FOUND"
    if "read failed" in e or "i/o error" in e or "input/output error" in e:
        return "LVM_IO_ERROR"
    return "LVM_ERROR"


def _report(out: str, kind: str) -> list[dict[str, str]]:
    try:
        doc = json.loads(out)
        rows = doc["report"][0][kind]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise LvmError("LVM_BAD_REPORT", f"unreadable {kind} report", str(e)) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LvmError("LVM_BAD_REPORT", f"unreadable {kind} report")
    return rows


def _int(row: dict[str, str], key: str) -> int:
    try:
        return int(row.get(key, "0") or 0)
    except ValueError:
        raise LvmError("LVM_BAD_REPORT", f"{key} is not a number: {row.get(key)!r}") from None


def _tags(text: str) -> tuple[str, ...]:
    return tuple(t for t in (text or "").split(",") if t)


def parse_lvs(out: str) -> list[Lv]:
    """LVs of an lvs report, their segments merged (one row per segment)."""
    order: list[str] = []
    rows: dict[str, list[dict[str, str]]] = {}
    for row in _report(out, "lv"):
        name = row.get("lv_name", "")
        if name not in rows:
            order.append(name)
            rows[name] = []
        rows[name].append(row)
    out_lvs = []
    for name in order:
        segs = []
        for row in rows[name]:
            dev = row.get("devices", "")
            m = _DEVICES_RE.match(dev.split(",")[0]) if dev else None
            if m and "seg_start_pe" in row:
                segs.append(
                    Segment(
                        _int(row, "seg_start_pe"),
                        _int(row, "seg_size_pe"),
                        m["pv"],
                        int(m["pe"]),
                    )
                )
        first = rows[name][0]
        out_lvs.append(
            Lv(
                name=name,
                size=_int(first, "lv_size"),
                attr=first.get("lv_attr", ""),
                tags=_tags(first.get("lv_tags", "")),
                segments=tuple(sorted(segs, key=lambda s: s.lv_start)),
            )
        )
    return out_lvs


def parse_vgs(out: str) -> list[Vg]:
    return [
        Vg(
            name=r.get("vg_name", ""),
            size=_int(r, "vg_size"),
            free=_int(r, "vg_free"),
            extent_size=_int(r, "vg_extent_size"),
            tags=_tags(r.get("vg_tags", "")),
            pv_count=_int(r, "pv_count"),
            lv_count=_int(r, "lv_count"),
        )
        for r in _report(out, "vg")
    ]


def parse_pvs(out: str) -> list[Pv]:
    return [
        Pv(
            name=r.get("pv_name", ""),
            vg=r.get("vg_name", ""),
            size=_int(r, "pv_size"),
            free=_int(r, "pv_free"),
            pe_start=_int(r, "pe_start"),
            pe_count=_int(r, "pv_pe_count"),
        )
        for r in _report(out, "pv")
    ]


class Lvm:
    """lvm commands under one private configuration.

    ``calls`` counts the commands run (the benchmarks report it per SMAPI call).
    """

    def __init__(
        self,
        config: LvmConfig,
        runner: Callable[..., Any] | None = None,
        timeout: float = LVM_TIMEOUT,
    ) -> None:
        self.config = config
        self._runner = runner
        self.timeout = timeout
        self.calls = 0
        self._written = False

    def run(self, argv: list[str], what: str, ok_codes: Iterable[int] = (0,)) -> Any:
        """Run one lvm command; LvmError on failure (never a raw CommandError)."""
        if self._runner is None:
            from smcommon.runner import run

            self._runner = run
        if not self._written:
            self.config.write()
            self._written = True
        self.calls += 1
        start = time.monotonic()
        try:
            res = self._runner(
                argv, timeout=self.timeout, env=self.config.env(), ok_codes=tuple(ok_codes)
            )
        except CommandTimeout:
            raise LvmError(
                "LVM_TIMEOUT",
                what,
                f"{argv[0]} did not finish within {self.timeout:g}s (is the LUN reachable?)",
            ) from None
        except CommandError as e:
            raise LvmError(_classify(e.err), what, _tail(e.err or e.out)) from None
        log.info("lvm %s (%.3fs)", " ".join(argv), time.monotonic() - start)
        return res

    # --- physical volumes and volume groups ------------------------------------

    def pvcreate(self, device: str) -> None:
        self.run(["pvcreate", "-ff", "-y", device], f"pvcreate {device}")

    def pvremove(self, device: str) -> None:
        self.run(["pvremove", "-ff", "-y", device], f"pvremove {device}")

    def pvs(self) -> list[Pv]:
        res = self.run(
            ["pvs", "--reportformat", "json", "-o", PV_FIELDS, "--units", "b", "--nosuffix"],
            "pvs",
        )
        return parse_pvs(res.out)

    def vgcreate(self, vg: str, device: str, tags: Sequence[str] = ()) -> None:
        argv = ["vgcreate"]
        for t in tags:
            argv += ["--addtag", check_tag(t)]
        self.run([*argv, vg, device], f"vgcreate {vg}")

    def vgremove(self, vg: str) -> None:
        self.run(["vgremove", "-f", vg], f"vgremove {vg}")

    def vgs(self, vg: str) -> Vg:
        res = self.run(
            ["vgs", "--reportformat", "json", "-o", VG_FIELDS, "--units", "b", "--nosuffix", vg],
            f"vgs {vg}",
        )
        found = parse_vgs(res.out)
        if not found:
            raise LvmError("LVM_VG_NOT_FOUND", f"vgs {vg}", f'Volume group "{vg}" not found')
        return found[0]

    def vg_tags(self, vg: str, add: Sequence[str] = (), delete: Sequence[str] = ()) -> None:
        argv = ["vgchange"]
        for t in delete:
            argv += ["--deltag", check_tag(t)]
        for t in add:
            argv += ["--addtag", check_tag(t)]
        self.run([*argv, vg], f"vgchange tags of {vg}")

    # --- logical volumes ---------------------------------------------------------

    def lvcreate(
        self,
        vg: str,
        name: str,
        size: int,
        tags: Sequence[str] = (),
        contiguous: bool = False,
        where: str = "",
    ) -> None:
        """A new inactive LV; ``where`` (``PV:first-last``) places its extents."""
        argv = ["lvcreate", "-n", name, "-L", _size_arg(size), "-an", "-Zn"]
        for t in tags:
            argv += ["--addtag", check_tag(t)]
        if contiguous:
            argv += ["--alloc", "contiguous"]
        self.run([*argv, vg, *([where] if where else [])], f"lvcreate {vg}/{name}")

    def lvremove(self, vg: str, name: str, missing_ok: bool = False) -> bool:
        try:
            self.run(["lvremove", "-f", f"{vg}/{name}"], f"lvremove {vg}/{name}")
        except LvmError as e:
            if missing_ok and e.code == "LVM_LV_NOT_FOUND":
                return False
            raise
        return True

    def lvrename(self, vg: str, old: str, new: str) -> None:
        self.run(["lvrename", vg, old, new], f"lvrename {vg}/{old} to {new}")

    def lvresize(self, vg: str, name: str, size: int, contiguous: bool = False) -> None:
        """Grow or shrink to ``size`` bytes; the same size is not an error."""
        argv = ["lvresize", "-f", "-L", _size_arg(size)]
        if contiguous:
            argv += ["--alloc", "contiguous"]
        try:
            self.run([*argv, f"{vg}/{name}"], f"lvresize {vg}/{name}")
        except LvmError as e:
            if "matches existing size" in " ".join(e.details):
                return
            raise

    def lv_tags(
        self, vg: str, name: str, add: Sequence[str] = (), delete: Sequence[str] = ()
    ) -> None:
        argv = ["lvchange"]
        for t in delete:
            argv += ["--deltag", check_tag(t)]
        for t in add:
            argv += ["--addtag", check_tag(t)]
        self.run([*argv, f"{vg}/{name}"], f"lvchange tags of {vg}/{name}")

    def lvchange_active(self, vg: str, name: str, active: bool) -> None:
        flag = "-ay" if active else "-an"
        self.run(["lvchange", flag, f"{vg}/{name}"], f"lvchange {flag} {vg}/{name}")

    def report(self, vg: str) -> tuple[Vg | None, list[Lv]]:
        """The VG (size, free, extent size, tags) and all its LVs with their
        segments, in one command (None for the VG if it has no LV)."""
        res = self.run(
            ["lvs", "--reportformat", "json", "-o", REPORT_FIELDS, "--units", "b",
             "--nosuffix", vg],
            f"lvs {vg}",
        )
        return parse_report(res.out, vg)

    def lvs(self, vg: str, names: Sequence[str] = ()) -> list[Lv]:
        """The LVs of ``vg`` (or just ``names``) with their segments: one command."""
        targets = [f"{vg}/{n}" for n in names] or [vg]
        res = self.run(
            [
                "lvs",
                "--reportformat",
                "json",
                "-o",
                LV_FIELDS,
                "--units",
                "b",
                "--nosuffix",
                *targets,
            ],
            f"lvs {' '.join(targets)}",
        )
        return parse_lvs(res.out)


def parse_report(out: str, vg: str) -> tuple[Vg | None, list[Lv]]:
    """An lvs report with the VG's fields on every row: the VG and its LVs."""
    rows = _report(out, "lv")
    if not rows:
        return None, []
    r = rows[0]
    vg_rec = Vg(
        name=r.get("vg_name", vg),
        size=_int(r, "vg_size"),
        free=_int(r, "vg_free"),
        extent_size=_int(r, "vg_extent_size"),
        tags=_tags(r.get("vg_tags", "")),
    )
    return vg_rec, parse_lvs(out)


def _tail(text: str, n: int = 800) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("WARNING: Activation disabled")]
    return " / ".join(lines)[-n:]
