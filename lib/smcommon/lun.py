"""An iSCSI LUN as a block device on this host: the initiator seam.

``choose_initiator()`` picks, kernel first:

- ``KernelInitiator``: open-iscsi (``smcommon.iscsi``): node record with CHAP,
  login (idempotent; a target shared by several SRs is logged out only when
  the last one is done with it), the LUN's disk found by SCSI id
  (``smcommon.scsi``) among the disks of the session;
- ``UserspaceInitiator``, where the kernel has no iSCSI initiator: the LUN is
  exported by ``qemu-storage-daemon`` (libiscsi, CHAP from a 0600 secret file)
  as a FUSE file, and a loop device over that file is the block device: real
  iSCSI traffic carries every byte.  Which LUN has the wanted SCSI id is asked
  of the target itself (``smcommon.iscsi_probe``).

Both answer ``targets`` (the IQNs a portal offers) and ``luns`` (a target's
LUNs with SCSI ids and sizes) so an SR.create without targetIQN or SCSIid can
tell a person what there is; ``attach``/``detach``; and ``check``, a quick
pre-flight (a login, bounded) run before anything does I/O that would block
while the target is away.  What an attach made is kept in a small JSON state
(the caller stores it, 0600, never with a secret).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from smcommon import iscsi_probe, loop
from smcommon.errors import BackendError
from smcommon.iscsi_probe import Chap, LunInfo, ProbeError
from smcommon.record import record

log = logging.getLogger(__name__)

QSD = "qemu-storage-daemon"
QSD_READY_TIMEOUT = 20.0
QSD_STOP_TIMEOUT = 10.0
CHECK_TIMEOUT = 5.0
DISK_APPEAR_TIMEOUT = 15.0


@record(frozen=True)
class LunSpec:
    """Which LUN: portals (tried in order), target IQN, SCSI id, CHAP."""

    portals: tuple[tuple[str, int], ...]
    iqn: str = ""
    scsi_id: str = ""
    chap: Chap | None = None
    multihomed: bool = False


def describe_luns(luns: list[LunInfo]) -> list[str]:
    return [
        f"LUN {lun.lun}: SCSIid {lun.scsi_id or '?'}, {lun.size} bytes, "
        f"{lun.vendor} {lun.model}".rstrip()
        for lun in luns
        if lun.device_type == iscsi_probe.TYPE_DISK
    ]


class Initiator(Protocol):
    name: str

    def targets(self, spec: LunSpec) -> list[tuple[str, str]]: ...
    def luns(self, spec: LunSpec) -> list[LunInfo]: ...
    def attach(self, sr: str, spec: LunSpec, state_dir: Path) -> dict[str, Any]: ...
    def detach(self, sr: str, state: dict[str, Any]) -> None: ...
    def check(self, spec: LunSpec, state: dict[str, Any]) -> None: ...


def choose_initiator(
    run_dir: Path,
    runner: Callable[..., Any] | None = None,
    sys_root: str = "/sys",
) -> Initiator:
    """The kernel's initiator when this host has one, else the userspace one."""
    if kernel_has_iscsi(sys_root) and shutil.which("iscsiadm"):
        return KernelInitiator(run_dir, runner)
    if shutil.which(QSD) and os.path.exists("/dev/fuse"):
        return UserspaceInitiator(run_dir, runner)
    raise BackendError(
        "ISCSI_NO_INITIATOR",
        [
            ("no iSCSI initiator on this host: neither the kernel's (iscsi_tcp and "
            "open-iscsi) nor qemu-storage-daemon with FUSE (qemu-system-common, "
            "qemu-block-extra)")
        ],
    )


def kernel_has_iscsi(sys_root: str = "/sys") -> bool:
    """iscsi_tcp is loaded (or built in), or loads now."""
    if os.path.exists(os.path.join(sys_root, "module", "iscsi_tcp")) or os.path.exists(
        os.path.join(sys_root, "class", "iscsi_transport", "tcp")
    ):
        return True
    if sys_root == "/sys" and shutil.which("modprobe") and os.path.isdir(
        f"/lib/modules/{os.uname().release}"
    ):
        from smcommon.runner import run

        with contextlib.suppress(Exception):
            run(["modprobe", "-q", "iscsi_tcp"], timeout=10.0)
        return os.path.exists("/sys/module/iscsi_tcp")
    return False


def _portal_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the kernel's initiator ------------------------------------------------------------------


class KernelInitiator:
    """open-iscsi: iscsiadm node records, sessions, and the session's SCSI disks."""

    name = "kernel (open-iscsi iscsiadm)"

    def __init__(self, run_dir: Path, runner: Callable[..., Any] | None = None,
                 sysfs: str = "/sys", dev: str = "/dev") -> None:
        from smcommon.iscsi import Iscsiadm, TargetUsers

        self.adm = Iscsiadm(runner)
        self.users = TargetUsers(run_dir)
        self.runner = runner
        self.sysfs = sysfs
        self.dev = dev

    def targets(self, spec: LunSpec) -> list[tuple[str, str]]:
        out = []
        for host, port in spec.portals:
            out += [(t.iqn, t.portal) for t in self.adm.discover(_portal_text(host, port))]
        return out

    def _login(self, spec: LunSpec) -> list[str]:
        """Log in to every portal (multihomed) or the first that works; the portals."""
        done: list[str] = []
        last: BackendError | None = None
        for host, port in spec.portals:
            portal = _portal_text(host, port)
            try:
                self.adm.node_new(spec.iqn, portal)
                c = spec.chap
                if c is None:
                    self.adm.set_chap(spec.iqn, portal)
                else:
                    self.adm.set_chap(spec.iqn, portal, c.user, c.secret, c.in_user, c.in_secret)
                self.adm.login(spec.iqn, portal)
            except BackendError as e:
                last = e
                continue
            done.append(portal)
            if not spec.multihomed:
                break
        if not done:
            assert last is not None
            raise last
        return done

    def _disks(self, spec: LunSpec, portal: str) -> list[str]:
        for s in self.adm.sessions():
            if s.iqn == spec.iqn and s.portal == portal:
                return [d.name for d in self.adm.session_disks(s.sid)]
        raise BackendError("ISCSI_SESSION_LOST", [f"no session with {spec.iqn} at {portal}"])

    def luns(self, spec: LunSpec) -> list[LunInfo]:
        from smcommon.scsi import read_disk, scsi_id

        portals = self._login(spec)
        try:
            out = []
            for s in self.adm.sessions():
                if s.iqn != spec.iqn or s.portal != portals[0]:
                    continue
                for d in self.adm.session_disks(s.sid):
                    info = read_disk(d.name, self.sysfs)
                    sid = scsi_id(os.path.join(self.dev, d.name), self.runner) or ""
                    out.append(LunInfo(d.lun, sid, info.size, info.vendor, info.model, 0))
            return out
        finally:
            for portal in portals:
                if not self.users.remove(spec.iqn, portal, "-probe-"):
                    self.adm.logout(spec.iqn, portal)

    def attach(self, sr: str, spec: LunSpec, state_dir: Path) -> dict[str, Any]:
        from smcommon.scsi import find_disk

        portals = self._login(spec)
        for portal in portals:
            self.users.add(spec.iqn, portal, sr)
        deadline = time.monotonic() + DISK_APPEAR_TIMEOUT
        while True:
            names = self._disks(spec, portals[0])
            device = find_disk(spec.scsi_id, names, self.runner, self.sysfs, self.dev)
            if device is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if device is None:
            self.detach(sr, {"iqn": spec.iqn, "portals": portals})
            raise BackendError(
                "ISCSI_LUN_NOT_FOUND",
                [f"no LUN of {spec.iqn} has SCSIid {spec.scsi_id} (disks: {', '.join(names)})"],
            )
        return {"backend": "kernel", "device": device, "iqn": spec.iqn, "portals": portals}

    def detach(self, sr: str, state: dict[str, Any]) -> None:
        for portal in state.get("portals", []):
            if not self.users.remove(state["iqn"], portal, sr):
                self.adm.logout(state["iqn"], portal)

    def check(self, spec: LunSpec, state: dict[str, Any]) -> None:
        portals = state.get("portals", [])
        live = {(s.iqn, s.portal) for s in self.adm.sessions()}
        if not any((state.get("iqn"), p) in live for p in portals):
            raise BackendError(
                "ISCSI_SESSION_LOST",
                [f"no iSCSI session with {state.get('iqn')} at {', '.join(portals)}"],
            )


# --- the userspace initiator: qemu-storage-daemon, FUSE and a loop device -------------------


class UserspaceInitiator:
    """qemu-storage-daemon exporting the LUN as a FUSE file; a loop device over it."""

    name = "userspace (qemu-storage-daemon iscsi export over FUSE + loop device)"

    def __init__(self, run_dir: Path, runner: Callable[..., Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.runner = runner

    def _each_portal(self, spec: LunSpec, fn: Callable[[str, int], Any]) -> Any:
        last: ProbeError | None = None
        for host, port in spec.portals:
            try:
                return fn(host, port)
            except ProbeError as e:
                if e.code not in ("ISCSI_UNREACHABLE", "ISCSI_TIMEOUT"):
                    raise
                last = e
        assert last is not None
        raise last

    def targets(self, spec: LunSpec) -> list[tuple[str, str]]:
        out = []
        for host, port in spec.portals:
            out += [(t.iqn, t.portal) for t in iscsi_probe.discover(host, port, spec.chap)]
        return out

    def luns(self, spec: LunSpec) -> list[LunInfo]:
        return list(self._each_portal(
            spec, lambda h, p: iscsi_probe.probe_luns(h, p, spec.iqn, spec.chap)
        ))

    def attach(self, sr: str, spec: LunSpec, state_dir: Path) -> dict[str, Any]:
        def find(host: str, port: int) -> tuple[str, int, int]:
            luns = iscsi_probe.probe_luns(host, port, spec.iqn, spec.chap)
            for lun in luns:
                if lun.scsi_id.lower() == spec.scsi_id.lower():
                    return host, port, lun.lun
            raise BackendError(
                "ISCSI_LUN_NOT_FOUND",
                [f"no LUN of {spec.iqn} has SCSIid {spec.scsi_id}", *describe_luns(luns)],
            )

        host, port, lun = self._each_portal(spec, find)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fuse = state_dir / "lun.fuse"
        fuse.touch(mode=0o600)
        proc, secret = self._start(spec, host, port, lun, fuse, state_dir)
        state: dict[str, Any] = {
            "backend": "userspace",
            "iqn": spec.iqn,
            "portals": [_portal_text(host, port)],
            "lun": lun,
            "pid": proc.pid,
            "pid_start": _start_time(proc.pid),
            "fuse": str(fuse),
        }
        try:
            self._wait_ready(proc, fuse, state_dir / "qsd.log", spec)
            state["device"] = loop.attach(str(fuse), runner=self.runner)
        except BaseException:
            self.detach(sr, state)
            raise
        finally:
            if secret is not None:
                with contextlib.suppress(FileNotFoundError):
                    secret.unlink()
        return state

    def _start(self, spec: LunSpec, host: str, port: int, lun: int, fuse: Path,
               state_dir: Path) -> tuple[Any, Path | None]:
        from smcommon.runner import spawn

        def esc(v: str) -> str:
            return v.replace(",", ",,")

        blockdev = (f"driver=iscsi,node-name=lun,transport=tcp,portal={esc(_portal_text(host, port))},"
                    f"target={esc(spec.iqn)},lun={lun},"
                    f"initiator-name={esc(iscsi_probe.initiator_name())},header-digest=none")
        argv = [QSD]
        secret = None
        if spec.chap is not None:
            secret = state_dir / "chap.secret"
            with contextlib.suppress(FileNotFoundError):
                secret.unlink()
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, spec.chap.secret.encode())
            finally:
                os.close(fd)
            argv += ["--object", f"secret,id=chap,file={esc(str(secret))}"]
            blockdev += f",user={esc(spec.chap.user)},password-secret=chap"
        argv += [
            "--blockdev", blockdev,
            "--export", f"type=fuse,id=lun,node-name=lun,mountpoint={esc(str(fuse))},writable=on",
        ]
        log_path = state_dir / "qsd.log"
        with contextlib.suppress(FileNotFoundError):
            log_path.unlink()
        return spawn(argv, log_path=str(log_path)), secret

    def _wait_ready(self, proc: Any, fuse: Path, log_path: Path, spec: LunSpec) -> None:
        deadline = time.monotonic() + QSD_READY_TIMEOUT
        delay = 0.005
        while not _fuse_mounted(str(fuse)):
            if proc.poll() is not None:
                raise _qsd_failure(log_path, spec)
            if time.monotonic() > deadline:
                raise BackendError("QSD_TIMEOUT", [
                    (f"qemu-storage-daemon did not export {spec.iqn} within "
                    f"{QSD_READY_TIMEOUT:g}s: {_tail(log_path)}")])
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def detach(self, sr: str, state: dict[str, Any]) -> None:
        device = state.get("device")
        if device and _loop_backed_by(device, state.get("fuse", ""), self.runner):
            loop.detach(device, self.runner)
        pid = state.get("pid")
        if pid and _start_time(int(pid)) == state.get("pid_start"):
            _stop(int(pid))
        fuse = state.get("fuse")
        if fuse and _fuse_mounted(fuse):
            from smcommon.runner import run

            with contextlib.suppress(Exception):
                run(["umount", "-l", fuse], timeout=30.0)
        if fuse:
            with contextlib.suppress(OSError):
                os.unlink(fuse)

    def check(self, spec: LunSpec, state: dict[str, Any]) -> None:
        pid = state.get("pid")
        if not pid or _start_time(int(pid)) != state.get("pid_start") or not _fuse_mounted(
            state.get("fuse", "")
        ):
            raise BackendError(
                "ISCSI_SESSION_LOST",
                [(f"the qemu-storage-daemon carrying {state.get('iqn')} is gone: detach and "
                 "attach the SR again")],
            )
        portal = state.get("portals", [""])[0]
        host, port = iscsi_probe.split_portal(portal)
        iscsi_probe.check_target(host, port, spec.iqn or state.get("iqn", ""), spec.chap,
                                 CHECK_TIMEOUT)


def _qsd_failure(log_path: Path, spec: LunSpec) -> BackendError:
    text = _tail(log_path)
    low = text.lower()
    if "authentication failure" in low or "auth" in low and "fail" in low:
        return BackendError("ISCSI_CHAP_FAILED", [
            f"the target {spec.iqn} refused the CHAP credentials (wrong user or secret)"])
    if "connection refused" in low or "failed to connect" in low or "unreachable" in low:
        return BackendError("ISCSI_UNREACHABLE", [f"cannot reach {spec.iqn}: {text}"])
    return BackendError("QSD_FAILED", [f"qemu-storage-daemon could not export {spec.iqn}", text])


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[-4:])[-n:]


def _fuse_mounted(path: str) -> bool:
    if not path:
        return False
    target = path.replace(" ", "\\040")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == target and " - fuse" in line:
                    return True
    except OSError:
        pass
    return False


def _start_time(pid: int) -> str:
    """A process's start time (field 22 of /proc/PID/stat): pid + start = identity."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return ""
        return fields[19]
    except (OSError, IndexError):
        return ""


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + QSD_STOP_TIMEOUT
    while _start_time(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    if _start_time(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _loop_backed_by(device: str, backing: str, runner: Callable[..., Any] | None) -> bool:
    """The loop ``device`` still maps ``backing`` (never detach a reused number)."""
    return any(lp.name == device and lp.back_file == backing for lp in loop.list_loops(runner))
