"""What is specific to the lvmoiscsi SR type: an iSCSI LUN carved with LVM.

device_config:
  target        the portal's host (or several, comma-separated; host:port too)
  port          the portals' TCP port (3260)
  targetIQN     the target; without it SR.create/attach answers the IQNs found
  SCSIid        which LUN (udev's scsi_id); without it, the LUNs found
  chapuser, chappassword                   CHAP the target checks
  incoming_chapuser, incoming_chappassword mutual CHAP (the target proves itself)
  multihomed    "true": log in through every portal (kernel initiator)
  takeover      "true": attach even if another host owns the SR (it loses it)

The LUN is a physical volume holding the volume group ``VG_XenStorage-<sr>``:
the ``MGT`` logical volume (ext4, mounted as the SR directory: the engine's
VDI records and journals) and one LV per volume (``smcommon.lvhd.store``).
Which iSCSI initiator and how LVs become block devices are chosen per host,
kernel first (``smcommon.lun``, ``smcommon.lvhd.activation``), and reported
by Query.diagnostics.

One host owns the VG's metadata: SR.attach tags the VG ``sm_owner=<host id>``
(SR.detach removes it); another host's SR.attach is refused while the tag is
there, unless ``takeover`` is set.  What this host made for an attached SR
(LUN state, the private lvm configuration) is in ``<run_dir>/lvmoiscsi/<sr>/``
(0700); CHAP secrets are never written anywhere but qemu-storage-daemon's
one-shot secret file (0600, removed once it has read it).
"""

from __future__ import annotations

import os
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from smcommon.engine.front import SrPlugin
    from smcommon.lun import LunSpec
    from smcommon.paths import Paths

DRIVER = "lvmoiscsi"
# What a call may import, imported once by the dispatcher's warm parent of this
# plugin (dispatcher/zygote.py); a direct run imports only what its method needs.
WARM_IMPORTS = [
    "smcommon.engine.front",
    "smcommon.errors",
    "smcommon.fileio",
    "smcommon.iscsi_probe",
    "smcommon.lun",
    "smcommon.lvm",
    "smcommon.lvhd.activation",
    "smcommon.lvhd.store",
    "json",
    "socket",
    "uuid",
]
VERSION = "0.1.0"
MGT_SIZE = 64 * 1024 * 1024
MKFS_TIMEOUT = 300.0
MOUNT_TIMEOUT = 120.0
PORTAL_CHECK_TIMEOUT = 3.0

CONFIGURATION = {
    "target": "the iSCSI portal's host name or address (several: comma-separated; host:port)",
    "port": "the portals' TCP port (default 3260)",
    "targetIQN": "the iSCSI target's IQN (without it, SR.create/attach lists the IQNs found)",
    "SCSIid": "the LUN's SCSI id (without it, SR.create/attach lists the LUNs found)",
    "chapuser": "CHAP user name the target checks",
    "chappassword": "CHAP secret (never logged or stored)",
    "incoming_chapuser": "mutual CHAP: the user name the target answers with",
    "incoming_chappassword": "mutual CHAP: the target's secret (never logged or stored)",
    "multihomed": "true: log in through every portal (kernel initiator only)",
    "takeover": "true: attach even if another host owns the SR (that host loses it)",
}
# never written to the host registry, a log line or an error (smcommon.plugin masks them)
SECRET_KEYS: frozenset[str] = frozenset({"chappassword", "incoming_chappassword"})
FEATURES = [
    "SR_ATTACH",
    "SR_DETACH",
    "SR_CREATE",
    "SR_DESTROY",
    "SR_RESET",
    "SR_SCAN",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_ATTACH",
    "VDI_DETACH",
    "VDI_ACTIVATE",
    "VDI_DEACTIVATE",
    "VDI_SNAPSHOT",
    "VDI_CLONE",
    "VDI_RESET_ON_BOOT/2",
    "VDI_COMPOSE",
    "VDI_COPY",
    "VDI_GET_URL",
    "SR_GC",
]
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:\d{1,5})?$")
_IQN_RE = re.compile(r"^(iqn\.|eui\.|naa\.)[A-Za-z0-9.:_-]{1,220}$")
_SCSIID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_USER_RE = re.compile(r"^[A-Za-z0-9._@:+-]{1,255}$")


def query_result() -> dict[str, object]:
    return {
        "driver": DRIVER,
        "name": "lvmoiscsi",
        "description": "VHD in LVM logical volumes on an iSCSI LUN",
        "vendor": "smcommon",
        "copyright": "LGPL-2.1-only",
        "version": VERSION,
        "required_api_version": "2.0",
        "features": list(FEATURES),
        "configuration": dict(CONFIGURATION),
    }


def _bad(why: str) -> Exception:
    from smcommon.errors import BackendError

    return BackendError("DEVICE_CONFIG_INVALID", [why])


def parse_config(dc: dict[str, str]) -> LunSpec:
    """device_config -> LunSpec; a clear error naming a missing or bad key (never
    a secret's value)."""
    from smcommon.iscsi_probe import Chap
    from smcommon.lun import LunSpec

    if not isinstance(dc, dict):
        raise _bad("device_config must be a map of strings")
    target = str(dc.get("target", "")).strip()
    if not target:
        raise _bad("device_config needs 'target': the iSCSI portal's host (several: "
                   "comma-separated)")
    port_text = str(dc.get("port", "3260")).strip() or "3260"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(f"device_config 'port' must be a TCP port number, not {port_text[:20]!r}")
    portals = []
    for item in target.split(","):
        item = item.strip()
        if not _HOST_RE.match(item):
            raise _bad(f"device_config 'target' holds {item[:80]!r}: not a host name, "
                       "address or host:port")
        host, port = item, int(port_text)
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = int(p)
        portals.append((host, port))
    iqn = str(dc.get("targetIQN", "")).strip()
    if iqn and not _IQN_RE.match(iqn):
        raise _bad(f"device_config 'targetIQN' is not an iSCSI name: {iqn[:80]!r}")
    scsi_id = str(dc.get("SCSIid", "")).strip()
    if scsi_id and not _SCSIID_RE.match(scsi_id):
        raise _bad(f"device_config 'SCSIid' is not a SCSI id: {scsi_id[:80]!r}")
    chap = None
    user, secret = dc.get("chapuser", ""), dc.get("chappassword", "")
    in_user, in_secret = dc.get("incoming_chapuser", ""), dc.get("incoming_chappassword", "")
    for name, value in (("chapuser", user), ("incoming_chapuser", in_user)):
        if value and not _USER_RE.match(str(value)):
            raise _bad(f"device_config '{name}' holds characters a CHAP name may not")
    for name, value in (("chappassword", secret), ("incoming_chappassword", in_secret)):
        if value and (not isinstance(value, str) or "\0" in value or "\n" in value
                      or len(value) > 255):
            raise _bad(f"device_config '{name}' is not a usable CHAP secret")
    if bool(user) != bool(secret):
        missing = "chappassword" if user else "chapuser"
        raise _bad(f"device_config has {'chapuser' if user else 'chappassword'} without "
                   f"'{missing}'")
    if bool(in_user) != bool(in_secret):
        missing = "incoming_chappassword" if in_user else "incoming_chapuser"
        raise _bad(f"device_config has incoming CHAP without '{missing}'")
    if in_user and not user:
        raise _bad("device_config: mutual CHAP (incoming_chapuser) needs 'chapuser' too")
    if user:
        chap = Chap(str(user), str(secret), str(in_user), str(in_secret))
    flags = {}
    for key in ("multihomed", "takeover"):
        value = str(dc.get(key, "false")).strip().lower()
        if value not in ("true", "false", "1", "0", "yes", "no", ""):
            raise _bad(f"device_config '{key}' must be true or false")
        flags[key] = value in ("true", "1", "yes")
    return LunSpec(tuple(portals), iqn, scsi_id, chap, flags["multihomed"])


def _takeover(dc: dict[str, str]) -> bool:
    return str(dc.get("takeover", "")).strip().lower() in ("true", "1", "yes")


def dm_available() -> bool:
    """device-mapper in this kernel (or loadable now)."""
    def present() -> bool:
        try:
            with open("/proc/misc", encoding="utf-8") as f:
                return any(line.split()[-1] == "device-mapper" for line in f if line.split())
        except OSError:
            return False

    if present():
        return True
    import shutil

    if shutil.which("modprobe") and os.path.isdir(f"/lib/modules/{os.uname().release}"):
        from smcommon.runner import run

        try:
            run(["modprobe", "-q", "dm_mod"], timeout=10.0)
        except Exception:  # noqa: BLE001 - absent module: no device-mapper
            return False
        return present()
    return False


def host_id(paths: Paths) -> str:
    """This host's identity (made once, kept in the state directory)."""
    import uuid

    path = paths.state_dir / "host-id"
    try:
        text = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return text
    except OSError:
        pass
    from smcommon.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    text = uuid.uuid4().hex
    atomic_write(path, text.encode() + b"\n")
    return text


class LvmoiscsiType:
    """The engine's SrType for lvmoiscsi."""

    name = DRIVER
    secret_keys = SECRET_KEYS

    def __init__(self, paths: Paths, runner: Any = None) -> None:
        self.paths = paths
        self.runner = runner

    def query(self) -> dict[str, object]:
        return query_result()

    # --- state of an SR on this host -------------------------------------------------

    def state_dir(self, sr: str) -> Path:
        from smcommon.paths import safe_name

        return self.paths.run_dir / "lvmoiscsi" / safe_name("sr", sr)

    def _load(self, sr: str) -> dict[str, Any] | None:
        import json

        try:
            doc = json.loads((self.state_dir(sr) / "state.json").read_text())
            return doc if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None

    def _save(self, sr: str, state: dict[str, Any]) -> None:
        from smcommon.fileio import atomic_write_json

        d = self.state_dir(sr)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(d / "state.json", state)

    def _initiator(self, state: dict[str, Any] | None = None) -> Any:
        from smcommon import lun

        if state is not None and state.get("lun", {}).get("backend") == "kernel":
            return lun.KernelInitiator(self.paths.run_dir, self.runner)
        if state is not None and state.get("lun", {}).get("backend") == "userspace":
            return lun.UserspaceInitiator(self.paths.run_dir, self.runner)
        return lun.choose_initiator(self.paths.run_dir, self.runner)

    def _lvm(self, sr: str, device: str, activation: bool) -> Any:
        from smcommon.lvm import Lvm, LvmConfig

        cfg = LvmConfig(self.state_dir(sr) / "lvm", [device], activation=activation,
                        udev=activation and os.path.exists("/run/udev/control"))
        return Lvm(cfg, self.runner)

    def _activations(self, sr: str, state: dict[str, Any], lvm: Any) -> Any:
        from smcommon.lvhd.activation import Activations, DmActivator, LoopActivator

        if state["activation"] == "dm":
            activator: Any = DmActivator(lvm, state["vg"])
        else:
            activator = LoopActivator(state["pv"], state["pe_start"], state["extent"],
                                      self.runner)
        return Activations(self.paths.run_dir / "lvhd" / sr, activator)

    # --- the SrType methods ------------------------------------------------------------

    def open(self, sr: str, device_config: dict[str, str], create: bool) -> tuple[Path, bool]:
        from smcommon.errors import BackendError
        from smcommon.lun import describe_luns

        spec = parse_config(device_config)
        old = self._load(sr)
        if old is not None:  # a killed SR.create/attach (or a reset) left this
            self.close(sr, self.paths.sr_mount(sr), True)
        initiator = self._initiator()
        if not spec.iqn:
            found = initiator.targets(spec)
            raise BackendError("ISCSI_TARGET_IQN_REQUIRED", [
                "device_config has no 'targetIQN'; the portal offers: "
                + ("; ".join(f"{iqn} ({portal})" for iqn, portal in found) or "no target")])
        if not spec.scsi_id:
            luns = describe_luns(initiator.luns(spec))
            raise BackendError("ISCSI_SCSIID_REQUIRED", [
                f"device_config has no 'SCSIid'; the LUNs of {spec.iqn} are: "
                + ("; ".join(luns) or "none")])
        d = self.state_dir(sr)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        lun_state = initiator.attach(sr, spec, d)
        state: dict[str, Any] = {
            "sr": sr,
            "lun": lun_state,
            "pv": lun_state["device"],
            "vg": "VG_XenStorage-" + sr,
            "activation": "dm" if dm_available() else "loop",
            "owner": "" if create else host_id(self.paths),
            "iscsi": {"iqn": spec.iqn, "portals": [list(p) for p in spec.portals],
                      "scsi_id": spec.scsi_id, "chapuser": spec.chap.user if spec.chap else ""},
        }
        self._save(sr, state)
        try:
            mnt = self._open_vg(sr, state, create, _takeover(device_config))
        except BaseException:
            self.close(sr, self.paths.sr_mount(sr), True)
            raise
        return mnt, True

    def _open_vg(self, sr: str, state: dict[str, Any], create: bool, takeover: bool) -> Path:
        from smcommon.errors import BackendError
        from smcommon.lvm import LvmError

        lvm = self._lvm(sr, state["pv"], state["activation"] == "dm")
        vg = state["vg"]
        if create:
            holders = [p for p in lvm.pvs() if p.name == state["pv"] and p.vg]
            if holders:
                raise BackendError("LUN_IN_USE", [
                    (f"the LUN ({state['lun'].get('iqn')} SCSIid "
                    f"{state['iscsi']['scsi_id']}) holds volume group {holders[0].vg}: "
                    "destroy that SR first")])
            lvm.pvcreate(state["pv"])
            lvm.vgcreate(vg, state["pv"])
        try:
            info = lvm.vgs(vg)
        except LvmError as e:
            if e.code == "LVM_VG_NOT_FOUND":
                raise BackendError("SR_NOT_FOUND", [
                    (f"the LUN holds no SR {sr} (no volume group {vg}): never created, "
                    "or destroyed?")]) from None
            raise
        pv = next(p for p in lvm.pvs() if p.name == state["pv"])
        state["pe_start"], state["pe_count"] = pv.pe_start, pv.pe_count
        state["extent"] = info.extent_size
        if not create:
            self._own(lvm, vg, info.tags, state["owner"], takeover)
        self._save(sr, state)
        acts = self._activations(sr, state, lvm)
        if create:
            lvm.lvcreate(vg, "MGT", MGT_SIZE, contiguous=state["activation"] == "loop")
        mgt = next((lv for lv in lvm.lvs(vg, ["MGT"])), None)
        if mgt is None:
            raise BackendError("SR_NOT_FOUND", [f"{vg} has no MGT volume"])
        (dev,) = acts.hold([("MGT", mgt)], "sr:mgt")
        if create:
            self.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", "sm-mgt",
                      os.path.realpath(dev)], timeout=MKFS_TIMEOUT)
        mnt = self.paths.sr_mount(sr)
        mnt.mkdir(parents=True, exist_ok=True)
        self.run(["mount", "-t", "ext4", os.path.realpath(dev), str(mnt)], timeout=MOUNT_TIMEOUT)
        return mnt

    def _own(self, lvm: Any, vg: str, tags: tuple[str, ...], me: str, takeover: bool) -> None:
        import socket

        from smcommon.errors import BackendError
        from smcommon.lvhd.store import OWNER_TAG

        others = [t for t in tags if t.startswith(OWNER_TAG) and t != OWNER_TAG + me]
        if others and not takeover:
            names = [t for t in tags if t.startswith("sm_host=")]
            who = ", ".join(t[len(OWNER_TAG):] for t in others)
            host = f" ({', '.join(n[8:] for n in names)})" if names else ""
            raise BackendError("SR_OWNED_BY_ANOTHER_HOST", [
                (f"volume group {vg} is attached read-write by host {who}{host}: detach it "
                "there, or attach with device_config takeover=true (that host loses it)")])
        hostname = re.sub(r"[^A-Za-z0-9_.+-]", "-", socket.gethostname())[:64] or "host"
        delete = [*others, *(t for t in tags if t.startswith("sm_host="))]
        add = [OWNER_TAG + me, f"sm_host={hostname}"]
        if OWNER_TAG + me in tags and not others:
            return
        lvm.vg_tags(vg, add=add, delete=delete)

    def run(self, argv: list[str], **kw: Any) -> Any:
        if self.runner is None:
            from smcommon.runner import run

            return run(argv, **kw)
        return self.runner(argv, **kw)

    def close(self, sr: str, sr_dir: Path, mounted: bool) -> None:
        self._release(sr, sr_dir, destroy=False)

    def destroy(self, sr: str, sr_dir: Path, entry: Any) -> None:
        self._release(sr, sr_dir, destroy=True)

    def _release(self, sr: str, sr_dir: Path, destroy: bool) -> None:
        import contextlib
        import logging
        import shutil

        from smcommon.lvhd.store import OWNER_TAG

        log = logging.getLogger(__name__)
        state = self._load(sr)
        if _mounted_at(str(self.paths.sr_mount(sr))):
            os.sync()
            self.run(["umount", str(self.paths.sr_mount(sr))], timeout=MOUNT_TIMEOUT)
        with contextlib.suppress(OSError):
            os.rmdir(self.paths.sr_mount(sr))
        if state is None:
            return
        lvm = self._lvm(sr, state["pv"], state.get("activation") == "dm")
        if "extent" in state:
            self._activations(sr, state, lvm).release_all()
        vg = state["vg"]
        try:
            if destroy:
                lvm.lvremove(vg, "MGT", missing_ok=True)
                lvm.vgremove(vg)
                lvm.pvremove(state["pv"])
            elif state.get("owner"):
                tags = lvm.vgs(vg).tags
                if OWNER_TAG + state["owner"] in tags:
                    lvm.vg_tags(vg, delete=[OWNER_TAG + state["owner"],
                                            *(t for t in tags if t.startswith("sm_host="))])
        except Exception as e:
            if destroy:
                raise
            log.warning("SR %s: could not release the VG's ownership: %s", sr, e)
        self._initiator(state).detach(sr, state["lun"])
        shutil.rmtree(self.state_dir(sr), ignore_errors=True)
        shutil.rmtree(self.paths.run_dir / "lvhd" / sr, ignore_errors=True)

    def wipe(self, sr: str, device_config: dict[str, str]) -> None:
        """Unused: ``destroy`` removes the VG while the LUN is still attached."""

    # --- the store of an attached SR --------------------------------------------------------

    def store(self, sr: str, sr_dir: Path, vhd: Any) -> Any:
        from smcommon.errors import BackendError
        from smcommon.lvhd.store import LVStore

        state = self._load(sr)
        if state is None or "extent" not in state:
            raise BackendError("SR_STATE_MISSING", [
                f"this host has no record of how SR {sr} is attached: SR.reset, then SR.attach"])
        self._check_reachable(state)
        lvm = self._lvm(sr, state["pv"], state["activation"] == "dm")
        return LVStore(sr_dir, state["vg"], lvm, state["pv"],
                       self._activations(sr, state, lvm),
                       pe_start=state["pe_start"], pe_count=state.get("pe_count", 0),
                       contiguous=state["activation"] == "loop",
                       owner=state.get("owner", ""), vhd=vhd)

    def _check_reachable(self, state: dict[str, Any]) -> None:
        """Before any I/O (which would block while the target is away): the LUN's
        carrier is there and a portal answers, within a bound."""
        import socket

        from smcommon.errors import BackendError
        from smcommon.iscsi_probe import split_portal

        lun = state["lun"]
        if lun.get("backend") == "userspace":
            from smcommon.lun import _fuse_mounted, _start_time

            if _start_time(int(lun.get("pid", 0))) != lun.get("pid_start") or \
                    not _fuse_mounted(lun.get("fuse", "")):
                raise BackendError("ISCSI_SESSION_LOST", [
                    (f"the qemu-storage-daemon carrying {lun.get('iqn')} is gone: "
                    "SR.detach (or SR.reset) and SR.attach again")])
        errors = []
        for portal in lun.get("portals", []):
            host, port = split_portal(portal)
            try:
                socket.create_connection((host, port), timeout=PORTAL_CHECK_TIMEOUT).close()
                return
            except OSError as e:
                errors.append(f"{portal}: {e.strerror or e}")
        raise BackendError("ISCSI_UNREACHABLE", [
            (f"the iSCSI target {lun.get('iqn')} does not answer ({'; '.join(errors)}): "
            "calls fail until it is back")])

    def backend_diagnostics(self) -> list[str]:
        from smcommon import lun

        try:
            initiator = lun.choose_initiator(self.paths.run_dir, self.runner).name
        except Exception as e:  # noqa: BLE001 - a report, never a failure
            initiator = f"none ({e})"
        activation = "device-mapper (lvchange -ay)" if dm_available() else \
            "loop devices over the LVs' extents (no device-mapper)"
        return [f"iSCSI initiator: {initiator}", f"LV activation: {activation}"]


def _mounted_at(mountpoint: str) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            return any(line.split()[1].replace("\\040", " ") == mountpoint
                       for line in f if len(line.split()) > 1)
    except OSError:
        return False


def factory(paths: Paths) -> SrPlugin:
    """What plugin.main calls: Query.query here, the rest in the engine."""
    from smcommon.engine.front import SrPlugin

    return SrPlugin(paths, LvmoiscsiType(paths))


driver_factory = factory  # the name bench/plugin_bench.py looks for
