"""open-iscsi's ``iscsiadm`` (the kernel initiator), through the one runner.

This module owns every iscsiadm command line: SendTargets discovery, node
records (created, CHAP set on them), login and logout, sessions and the SCSI
disks a session attached.  Exit codes are open-iscsi's (``ISCSI_ERR_*``,
include/iscsi_err.h); each maps to a clear ``IscsiError``:

- login is idempotent: ISCSI_ERR_SESS_EXISTS (15, "already present") is success;
- logout of a target not logged in (ISCSI_ERR_NO_OBJS_FOUND, 21) is success;
- a wrong or missing CHAP secret (ISCSI_ERR_LOGIN_AUTH_FAILED, 24) is
  ``ISCSI_CHAP_FAILED`` and never shows the secret.

CHAP secrets reach iscsiadm only as the value of a node-record update (that
is the only way iscsiadm takes them); they are passed to the runner as
``secrets``, so every error and log line shows ``******`` instead.

``TargetUsers`` counts, per host, which SRs use a target, so a target is
logged out only when no SR of this host still uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from smcommon.errors import BackendError, CommandError, CommandTimeout
from smcommon.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

ISCSIADM = "iscsiadm"
ISCSIADM_TIMEOUT = 30.0
DEFAULT_PORT = 3260

# open-iscsi exit codes (include/iscsi_err.h)
ISCSI_SUCCESS = 0
ISCSI_ERR = 1
ISCSI_ERR_SESS_NOT_FOUND = 2
ISCSI_ERR_TRANS = 4
ISCSI_ERR_LOGIN = 5
ISCSI_ERR_IDBM = 6
ISCSI_ERR_INVAL = 7
ISCSI_ERR_TRANS_TIMEOUT = 8
ISCSI_ERR_INTERNAL = 9
ISCSI_ERR_LOGOUT = 10
ISCSI_ERR_PDU_TIMEOUT = 11
ISCSI_ERR_TRANS_NOT_FOUND = 12
ISCSI_ERR_ACCESS = 13
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_ISCSID_COMM_ERR = 18
ISCSI_ERR_FATAL_LOGIN = 19
ISCSI_ERR_ISCSID_NOTCONN = 20
ISCSI_ERR_NO_OBJS_FOUND = 21
ISCSI_ERR_SYSFS_LOOKUP = 22
ISCSI_ERR_LOGIN_AUTH_FAILED = 24

_CODES = {
    ISCSI_ERR_TRANS_TIMEOUT: ("ISCSI_TIMEOUT", "the connection to the portal timed out"),
    ISCSI_ERR_PDU_TIMEOUT: ("ISCSI_UNREACHABLE", "no answer from the portal"),
    ISCSI_ERR_TRANS_NOT_FOUND: (
        "ISCSI_NO_INITIATOR",
        "the kernel has no iSCSI initiator (iscsi_tcp not loaded)",
    ),
    ISCSI_ERR_FATAL_LOGIN: (
        "ISCSI_LOGIN_FAILED",
        "the portal refused the login (no such target there?)",
    ),
    ISCSI_ERR_NO_OBJS_FOUND: ("ISCSI_NOT_FOUND", "no such node record or session"),
    ISCSI_ERR_LOGIN_AUTH_FAILED: (
        "ISCSI_CHAP_FAILED",
        "the target refused the CHAP credentials (wrong user or secret)",
    ),
    ISCSI_ERR_ISCSID_NOTCONN: ("ISCSI_NO_DAEMON", "cannot reach iscsid"),
    ISCSI_ERR_ISCSID_COMM_ERR: ("ISCSI_NO_DAEMON", "cannot reach iscsid"),
    ISCSI_ERR_SYSFS_LOOKUP: ("ISCSI_NOT_FOUND", "no such session"),
    ISCSI_ERR_ACCESS: ("ISCSI_ACCESS_DENIED", "iscsiadm needs root"),
}

_TARGET_RE = re.compile(r"^(?P<portal>\S+),(?P<tpgt>-?\d+)\s+(?P<iqn>\S+)$")
_SESSION_RE = re.compile(
    r"^(?P<transport>\w+):\s+\[(?P<sid>\d+)\]\s+(?P<portal>\S+),(?P<tpgt>-?\d+)\s+(?P<iqn>\S+)"
)
_LUN_RE = re.compile(r"scsi\d+\s+Channel\s+\d+\s+Id\s+\d+\s+Lun:\s+(?P<lun>\d+)")
_DISK_RE = re.compile(r"Attached scsi disk\s+(?P<disk>\S+)\s+State:\s+(?P<state>\S+)")


class IscsiError(BackendError):
    def __init__(self, code: str, what: str, detail: str = "") -> None:
        super().__init__(code, [what, detail] if detail else [what])


@record(frozen=True)
class Target:
    portal: str  # host:port
    tpgt: int
    iqn: str


@record(frozen=True)
class Session:
    sid: int
    portal: str
    tpgt: int
    iqn: str


@record(frozen=True)
class Disk:
    lun: int
    name: str  # sda
    state: str


def portal_of(host: str, port: int = DEFAULT_PORT) -> str:
    """``host:port`` as iscsiadm takes it (IPv6 in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class Iscsiadm:
    """iscsiadm commands; ``runner`` is ``smcommon.runner.run`` or a replaying fake."""

    def __init__(
        self, runner: Callable[..., Any] | None = None, timeout: float = ISCSIADM_TIMEOUT
    ) -> None:
        self._runner = runner
        self.timeout = timeout

    def run(
        self,
        argv: list[str],
        what: str,
        ok_codes: tuple[int, ...] = (0,),
        secrets: tuple[str, ...] = (),
    ) -> Any:
        if self._runner is None:
            from smcommon.runner import run

            self._runner = run
        try:
            return self._runner(
                [ISCSIADM, *argv],
                timeout=self.timeout,
                ok_codes=ok_codes,
                secrets=secrets,
            )
        except CommandTimeout:
            raise IscsiError(
                "ISCSI_TIMEOUT", what, f"iscsiadm did not finish within {self.timeout:g}s"
            ) from None
        except CommandError as e:
            code, why = _CODES.get(e.rc, ("ISCSI_ERROR", f"iscsiadm exit code {e.rc}"))
            raise IscsiError(code, what, f"{why}: {_last_line(e.err or e.out)}") from None

    # --- discovery and node records ----------------------------------------------

    def discover(self, portal: str) -> list[Target]:
        """SendTargets discovery: the targets the portal offers."""
        res = self.run(
            ["-m", "discovery", "-t", "sendtargets", "-p", portal],
            f"SendTargets discovery at {portal}",
        )
        return parse_targets(res.out)

    def node_new(self, iqn: str, portal: str) -> None:
        self.run(["-m", "node", "-o", "new", "-T", iqn, "-p", portal], f"node record {iqn}")

    def node_update(
        self, iqn: str, portal: str, name: str, value: str, secret: bool = False
    ) -> None:
        self.run(
            ["-m", "node", "-T", iqn, "-p", portal, "--op", "update", "-n", name, "-v", value],
            f"setting {name} of {iqn}",
            secrets=(value,) if secret else (),
        )

    def node_delete(self, iqn: str, portal: str) -> None:
        self.run(
            ["-m", "node", "-o", "delete", "-T", iqn, "-p", portal],
            f"deleting node record {iqn}",
            ok_codes=(0, ISCSI_ERR_NO_OBJS_FOUND),
        )

    def set_chap(
        self,
        iqn: str,
        portal: str,
        user: str = "",
        password: str = "",
        in_user: str = "",
        in_password: str = "",
    ) -> None:
        """CHAP on the node record (AuthMethod None without a user)."""
        prefix = "node.session.auth."
        if not user:
            self.node_update(iqn, portal, prefix + "authmethod", "None")
            return
        self.node_update(iqn, portal, prefix + "authmethod", "CHAP")
        self.node_update(iqn, portal, prefix + "username", user)
        self.node_update(iqn, portal, prefix + "password", password, secret=True)
        if in_user:
            self.node_update(iqn, portal, prefix + "username_in", in_user)
            self.node_update(iqn, portal, prefix + "password_in", in_password, secret=True)

    # --- sessions ------------------------------------------------------------------

    def login(self, iqn: str, portal: str) -> bool:
        """Log in; True if a new session was made, False if one was there already."""
        res = self.run(
            ["-m", "node", "-T", iqn, "-p", portal, "-l"],
            f"login to {iqn} at {portal}",
            ok_codes=(0, ISCSI_ERR_SESS_EXISTS),
        )
        return bool(res.rc == 0)

    def logout(self, iqn: str, portal: str) -> bool:
        """Log out; False if there was no session."""
        res = self.run(
            ["-m", "node", "-T", iqn, "-p", portal, "-u"],
            f"logout of {iqn} at {portal}",
            ok_codes=(0, ISCSI_ERR_NO_OBJS_FOUND),
        )
        return bool(res.rc == 0)

    def sessions(self) -> list[Session]:
        res = self.run(
            ["-m", "session"], "listing iSCSI sessions", ok_codes=(0, ISCSI_ERR_NO_OBJS_FOUND)
        )
        return parse_sessions(res.out) if res.rc == 0 else []

    def session_disks(self, sid: int) -> list[Disk]:
        res = self.run(["-m", "session", "-r", str(sid), "-P", "3"], f"disks of session {sid}")
        return parse_disks(res.out)

    def rescan(self, sid: int) -> None:
        self.run(["-m", "session", "-r", str(sid), "--rescan"], f"rescan of session {sid}")


# --- parsing ---------------------------------------------------------------------


def parse_targets(out: str) -> list[Target]:
    found = []
    for line in out.splitlines():
        m = _TARGET_RE.match(line.strip())
        if m:
            found.append(Target(m["portal"], int(m["tpgt"]), m["iqn"]))
    return found


def parse_sessions(out: str) -> list[Session]:
    found = []
    for line in out.splitlines():
        m = _SESSION_RE.match(line.strip())
        if m:
            found.append(Session(int(m["sid"]), m["portal"], int(m["tpgt"]), m["iqn"]))
    return found


def parse_disks(out: str) -> list[Disk]:
    """(LUN, disk) pairs of a ``-m session -r SID -P 3`` dump (LUNs without a disk,
    such as tgt's controller LUN 0, are left out)."""
    disks = []
    lun: int | None = None
    for line in out.splitlines():
        m = _LUN_RE.search(line)
        if m:
            lun = int(m["lun"])
            continue
        d = _DISK_RE.search(line)
        if d and lun is not None:
            disks.append(Disk(lun, d["disk"], d["state"]))
            lun = None
    return disks


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-2] if len(lines) > 1 and "all portals" in lines[-1] else (lines[-1] if lines else "")


# --- who uses a target on this host ------------------------------------------------------


class TargetUsers:
    """Which SRs of this host use an iSCSI target (a file per target, under a lock)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "iscsi"

    def _name(self, iqn: str, portal: str) -> str:
        import hashlib  # here: an attach or detach, not every call of a warm parent

        return hashlib.sha1(f"{iqn}\0{portal}".encode()).hexdigest()[:24]

    @contextlib.contextmanager
    def _locked(self, iqn: str, portal: str) -> Iterator[Path]:
        from smcommon.lock import Lock

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = self._name(iqn, portal)
        with Lock(f"target-{name}", self.dir):
            yield self.dir / f"{name}.json"

    def _read(self, path: Path) -> list[str]:
        try:
            doc = json.loads(path.read_text())
            return [str(s) for s in doc.get("srs", [])]
        except (OSError, ValueError, AttributeError):
            return []

    def add(self, iqn: str, portal: str, sr: str) -> list[str]:
        """Record that ``sr`` uses the target; the users before."""
        from smcommon.fileio import atomic_write_json

        with self._locked(iqn, portal) as path:
            users = self._read(path)
            if sr not in users:
                atomic_write_json(path, {"iqn": iqn, "portal": portal, "srs": [*users, sr]})
            return users

    def remove(self, iqn: str, portal: str, sr: str) -> list[str]:
        """Forget ``sr``; the users left (log out when there are none)."""
        from smcommon.fileio import atomic_write_json

        with self._locked(iqn, portal) as path:
            users = [u for u in self._read(path) if u != sr]
            if users:
                atomic_write_json(path, {"iqn": iqn, "portal": portal, "srs": users})
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return users
