"""A real iSCSI target for the tests: Debian's tgt (userspace ``tgtd``) on 127.0.0.1.

Each ``Tgtd`` has its own control socket (``-C N``, a number no other tgtd
uses: tgtd's control sockets are shared machine-wide) and its own TCP port.
Targets are file-backed LUNs (sparse files) with a CHAP account each.  tgtd
ignores SIGTERM and SIGINT: it is stopped by deleting its targets and then
the system (``tgtadm --op delete --mode system``), killed if that fails, and
its ``/var/run/tgtd/socket.N`` files are removed.  ``kill`` / ``start`` let a
test take the target away and bring it back with the same configuration.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

SOCKET_DIR = Path("/var/run/tgtd")
CONTROL_BASE = 1100  # this branch's range of control numbers (others use theirs)


def available() -> str | None:
    """Why tgtd tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "tgtd, loop devices and mounts need root"
    for tool in ("tgtd", "tgtadm", "qemu-storage-daemon", "losetup", "lvm", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs it)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    tid: int
    iqn: str
    backing: Path
    user: str
    password: str

    @property
    def scsi_id(self) -> str:
        """tgt's default SCSI id of LUN 1 (NAA: 0e + tid + lun)."""
        return f"360000000000000000e000000{self.tid:04x}0001"


class Tgtd:
    started: ClassVar[list[str]] = []  # portals started (the test summary names them)

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ctl = self._control_number()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.targets: dict[int, Target] = {}
        self._next_tid = 1

    @staticmethod
    def _control_number() -> int:
        start = CONTROL_BASE + os.getpid() % 200
        for n in range(start, start + 400):
            if not (SOCKET_DIR / f"socket.{n}").exists() and not (
                SOCKET_DIR / f"socket.{n}.lock"
            ).exists():
                return n
        raise RuntimeError("no free tgtd control number")

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["tgtadm", "-C", str(self.ctl), "--lld", "iscsi", *args],
                           capture_output=True, text=True, timeout=30, check=False)
        if check and p.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: rc={p.returncode} {p.stderr}")
        return p

    def start(self) -> None:
        log = open(self.workdir / "tgtd.log", "ab")  # noqa: SIM115 - tgtd keeps it
        # not a process of any test's SM_ROOT (the leftover-process checks look for those)
        env = {k: v for k, v in os.environ.items() if k != "SM_ROOT"}
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{self.port}", "-C", str(self.ctl)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
        log.close()
        deadline = time.monotonic() + 15
        while self.adm("--op", "show", "--mode", "system", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tgtd did not start: {(self.workdir / 'tgtd.log').read_text()}")
            time.sleep(0.02)
        for t in self.targets.values():
            self._configure(t)
        Tgtd.started.append(self.portal)

    def _configure(self, t: Target) -> None:
        self.adm("--op", "new", "--mode", "target", "--tid", str(t.tid), "-T", t.iqn)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", str(t.tid), "--lun", "1",
                 "-b", str(t.backing))
        self.adm("--op", "new", "--mode", "account", "--user", t.user, "--password", t.password)
        self.adm("--op", "bind", "--mode", "account", "--tid", str(t.tid), "--user", t.user)
        self.adm("--op", "bind", "--mode", "target", "--tid", str(t.tid), "-I", "ALL")

    def add_target(self, name: str, size: int = 64 << 30) -> Target:
        tid = self._next_tid
        self._next_tid += 1
        backing = self.workdir / f"lun-{tid}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        t = Target(tid, f"iqn.2026-11.test.issue11:{name}-{tid}", backing, f"user{tid}",
                   secrets.token_hex(8))
        self.targets[tid] = t
        self._configure(t)
        return t

    def remove_target(self, t: Target) -> None:
        self.adm("--op", "delete", "--mode", "target", "--tid", str(t.tid), "--force",
                 check=False)
        self.adm("--op", "delete", "--mode", "account", "--user", t.user, check=False)
        self.targets.pop(t.tid, None)
        with contextlib.suppress(FileNotFoundError):
            t.backing.unlink()

    def kill(self) -> None:
        """The target goes away at once (as a crashed or unplugged array)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._clean_sockets()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for t in list(self.targets.values()):
                self.adm("--op", "delete", "--mode", "target", "--tid", str(t.tid), "--force",
                         check=False)
                self.adm("--op", "delete", "--mode", "account", "--user", t.user, check=False)
            self.adm("--op", "delete", "--mode", "system", check=False)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._clean_sockets()

    def _clean_sockets(self) -> None:
        for name in (f"socket.{self.ctl}", f"socket.{self.ctl}.lock"):
            with contextlib.suppress(FileNotFoundError):
                (SOCKET_DIR / name).unlink()
