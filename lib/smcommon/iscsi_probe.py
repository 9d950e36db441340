"""A small iSCSI initiator for discovery and identification (no data path).

Hosts without a kernel initiator carry their LUNs through qemu-storage-daemon
(``smcommon.lun``), which cannot tell which LUN has which SCSI id.  This
module speaks just enough iSCSI (RFC 7143) over a TCP socket, with bounded
waits, to answer that: a discovery session (SendTargets), and a normal session
to a target for REPORT LUNS, INQUIRY (standard, and VPD page 0x83 for the
SCSI id as udev's scsi_id computes it), READ CAPACITY(16).  It also serves as
a quick pre-flight check that a target answers, with CHAP, before any I/O is
started that would block while it is away.

CHAP (MD5) one-way or mutual; secrets stay in memory (``Chap`` hides them
from repr) and are never in an error.  No header or data digests, one
connection, one command at a time.
"""

from __future__ import annotations

import contextlib
import os
import socket

from smcommon.errors import BackendError
from smcommon.record import field, record
from smcommon.scsi import best_id, parse_designators

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

DEFAULT_PORT = 3260
TIMEOUT = 5.0
MAX_RECV = 262144
MAX_PDU_DATA = 16 * 1024 * 1024

OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_LOGOUT_REQ = 0x06
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_ASYNC = 0x32
OP_REJECT = 0x3F
IMMEDIATE = 0x40

STAGE_SECURITY = 0
STAGE_OPERATIONAL = 1
STAGE_FULL = 3

SCSI_GOOD = 0x00
SCSI_CHECK_CONDITION = 0x02
TYPE_DISK = 0x00
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0]) + (4096).to_bytes(4, "big") + bytes(2)

_LOGIN_STATUS = {
    0x0201: ("ISCSI_CHAP_FAILED", "authentication failed (wrong CHAP user or secret)"),
    0x0202: ("ISCSI_ACCESS_DENIED", "this initiator is not allowed to use the target"),
    0x0203: ("ISCSI_TARGET_NOT_FOUND", "no such target at this portal"),
    0x0204: ("ISCSI_TARGET_NOT_FOUND", "the target was removed"),
    0x0300: ("ISCSI_TARGET_ERROR", "target error"),
    0x0301: ("ISCSI_TARGET_ERROR", "the target service is unavailable"),
    0x0302: ("ISCSI_TARGET_ERROR", "the target is out of resources"),
}


class ProbeError(BackendError):
    def __init__(self, code: str, what: str, detail: str = "") -> None:
        super().__init__(code, [what, detail] if detail else [what])


@record(frozen=True)
class Chap:
    """CHAP credentials: ``user``/``secret`` the target checks, ``in_user``/
    ``in_secret`` (mutual CHAP) the target proves.  Secrets never in repr."""

    user: str
    secret: str = field(repr=False)
    in_user: str = ""
    in_secret: str = field(default="", repr=False)


@record(frozen=True)
class Target:
    portal: str  # host:port,tpgt as the target advertises it
    iqn: str


@record(frozen=True)
class LunInfo:
    lun: int
    scsi_id: str
    size: int
    vendor: str
    model: str
    device_type: int


def initiator_name() -> str:
    """This host's initiator name (open-iscsi's file if any, else a stable name)."""
    with contextlib.suppress(OSError), \
            open("/etc/iscsi/initiatorname.iscsi", encoding="utf-8") as f:
        for line in f:
            if line.startswith("InitiatorName="):
                return line.split("=", 1)[1].strip()
    host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname().lower())
    return f"iqn.2004-10.org.smcommon:{host or 'host'}"


def _keys(data: bytes) -> list[tuple[str, str]]:
    out = []
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out.append((k.decode("utf-8", "replace"), v.decode("utf-8", "replace")))
    return out


def _pack_keys(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def _chap_value(text: str) -> bytes:
    text = text.strip()
    if text[:2].lower() == "0x":
        return bytes.fromhex(text[2:])
    if text[:2].lower() == "0b":
        import base64

        return base64.b64decode(text[2:])
    raise ValueError("CHAP value neither hex nor base64")


def _lun_field(lun: int) -> bytes:
    if lun < 256:
        return bytes([0, lun, 0, 0, 0, 0, 0, 0])
    return bytes([0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0])


class Connection:
    """One iSCSI session over one TCP connection."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout: float = TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.where = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise ProbeError("ISCSI_UNREACHABLE", f"iSCSI portal {self.where}",
                             f"no answer within {timeout:g}s") from None
        except OSError as e:
            raise ProbeError("ISCSI_UNREACHABLE", f"iSCSI portal {self.where}",
                             e.strerror or str(e)) from None
        self.sock.settimeout(timeout)
        self.isid = bytes([0x80, 0x00, 0x00]) + os.urandom(3)
        self.itt = 0
        self.cmdsn = 1
        self.expstatsn = 0
        self.tsih = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- PDUs ---------------------------------------------------------------------

    def _send(self, bhs: bytearray, data: bytes = b"") -> None:
        bhs[5:8] = len(data).to_bytes(3, "big")
        pad = b"\0" * (-len(data) % 4)
        try:
            self.sock.sendall(bytes(bhs) + data + pad)
        except OSError as e:
            raise ProbeError("ISCSI_UNREACHABLE", f"iSCSI portal {self.where}",
                             f"connection lost: {e.strerror or e}") from None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise ProbeError("ISCSI_TIMEOUT", f"iSCSI portal {self.where}",
                                 f"no answer within {self.timeout:g}s") from None
            except OSError as e:
                raise ProbeError("ISCSI_UNREACHABLE", f"iSCSI portal {self.where}",
                                 f"connection lost: {e.strerror or e}") from None
            if not chunk:
                raise ProbeError("ISCSI_UNREACHABLE", f"iSCSI portal {self.where}",
                                 "the target closed the connection")
            buf += chunk
        return bytes(buf)

    def _recv(self) -> tuple[bytes, bytes]:
        while True:
            bhs = self._recv_exact(48)
            ahs = bhs[4] * 4
            dlen = int.from_bytes(bhs[5:8], "big")
            if dlen > MAX_PDU_DATA:
                raise ProbeError("ISCSI_PROTOCOL_ERROR", f"iSCSI portal {self.where}",
                                 f"PDU of {dlen} bytes")
            if ahs:
                self._recv_exact(ahs)
            data = self._recv_exact(dlen + (-dlen % 4))[:dlen]
            op = bhs[0] & 0x3F
            if op == OP_NOP_IN:
                ttt = bhs[20:24]
                if ttt != b"\xff\xff\xff\xff":  # a ping: answer it
                    out = bytearray(48)
                    out[0] = OP_NOP_OUT | IMMEDIATE
                    out[1] = 0x80
                    out[8:16] = bhs[8:16]
                    out[16:20] = b"\xff\xff\xff\xff"
                    out[20:24] = ttt
                    out[24:28] = self.cmdsn.to_bytes(4, "big")
                    out[28:32] = self.expstatsn.to_bytes(4, "big")
                    self._send(out)
                continue
            if op == OP_ASYNC:
                continue
            if op == OP_REJECT:
                raise ProbeError("ISCSI_PROTOCOL_ERROR", f"iSCSI portal {self.where}",
                                 f"the target rejected a PDU (reason {bhs[2]:#x})")
            if op in (OP_LOGIN_RSP, OP_TEXT_RSP, OP_LOGOUT_RSP, OP_SCSI_RSP) or (
                op == OP_DATA_IN and bhs[1] & 0x01
            ):
                self.expstatsn = int.from_bytes(bhs[24:28], "big") + 1
            return bhs, data

    def _next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        return self.itt

    # --- login ----------------------------------------------------------------------

    def login(self, target: str | None, chap: Chap | None = None) -> None:
        """Log in (discovery session when ``target`` is None) up to full feature."""
        what = f"login to {target or 'discovery'} at {self.where}"
        base = [("InitiatorName", initiator_name()),
                ("SessionType", "Normal" if target else "Discovery")]
        if target:
            base.append(("TargetName", target))
        stage = STAGE_SECURITY
        keys = [*base, ("AuthMethod", "CHAP,None" if chap else "None")]
        try:
            rsp_keys, stage = self._login_pdu(what, stage, STAGE_OPERATIONAL, not chap, keys)
        except ProbeError as e:
            if chap is None and e.code == "ISCSI_CHAP_FAILED":
                raise ProbeError("ISCSI_CHAP_REQUIRED", what, "the target requires CHAP: "
                                 "give chapuser and chappassword") from None
            raise
        if stage == STAGE_SECURITY:
            method = dict(rsp_keys).get("AuthMethod", "None")
            if method == "CHAP":
                assert chap is not None
                stage = self._chap(what, chap)
            elif not chap or method != "None":
                raise ProbeError("ISCSI_PROTOCOL_ERROR", what, f"AuthMethod={method}")
            else:
                _, stage = self._login_pdu(what, stage, STAGE_OPERATIONAL, True, [])
        if stage == STAGE_OPERATIONAL:
            ops = [("HeaderDigest", "None"), ("DataDigest", "None"),
                   ("MaxRecvDataSegmentLength", str(MAX_RECV)),
                   ("DefaultTime2Wait", "0"), ("DefaultTime2Retain", "0"),
                   ("ErrorRecoveryLevel", "0")]
            if target:
                ops += [("InitialR2T", "Yes"), ("ImmediateData", "Yes"),
                        ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"),
                        ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"),
                        ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
            for _ in range(8):
                _, stage = self._login_pdu(what, STAGE_OPERATIONAL, STAGE_FULL, True, ops)
                ops = []
                if stage == STAGE_FULL:
                    break
        if stage != STAGE_FULL:
            raise ProbeError("ISCSI_PROTOCOL_ERROR", what, "login did not complete")

    def _login_pdu(self, what: str, csg: int, nsg: int, transit: bool,
                   keys: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
        """One login request; the response's keys and the stage we are in after it."""
        bhs = bytearray(48)
        bhs[0] = OP_LOGIN_REQ | IMMEDIATE
        bhs[1] = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
        bhs[8:14] = self.isid
        bhs[14:16] = self.tsih.to_bytes(2, "big")
        bhs[16:20] = self._next_itt().to_bytes(4, "big")
        bhs[24:28] = self.cmdsn.to_bytes(4, "big")
        bhs[28:32] = self.expstatsn.to_bytes(4, "big")
        self._send(bhs, _pack_keys(keys))
        rsp, data = self._recv()
        if rsp[0] & 0x3F != OP_LOGIN_RSP:
            raise ProbeError("ISCSI_PROTOCOL_ERROR", what, f"unexpected PDU {rsp[0]:#x}")
        status = int.from_bytes(rsp[36:38], "big")
        if status:
            if rsp[36] == 0x01:
                raise ProbeError("ISCSI_REDIRECTED", what, "the target redirects elsewhere")
            code, why = _LOGIN_STATUS.get(status, ("ISCSI_LOGIN_FAILED", "login refused"))
            raise ProbeError(code, what, f"{why} (status {status:#06x})")
        self.tsih = int.from_bytes(rsp[14:16], "big")
        stage = (rsp[1] >> 2) & 0x03
        if rsp[1] & 0x80:
            stage = rsp[1] & 0x03
        return _keys(data), stage

    def _chap(self, what: str, chap: Chap) -> int:
        keys, stage = self._login_pdu(what, STAGE_SECURITY, STAGE_OPERATIONAL, False,
                                      [("CHAP_A", "5")])
        got = dict(keys)
        try:
            ident = int(got["CHAP_I"])
            challenge = _chap_value(got["CHAP_C"])
        except (KeyError, ValueError):
            raise ProbeError("ISCSI_PROTOCOL_ERROR", what, "no CHAP challenge") from None
        if got.get("CHAP_A", "5") != "5":
            raise ProbeError("ISCSI_PROTOCOL_ERROR", what, "CHAP algorithm not MD5")
        # here, not at the top, where OpenSSL's memory would be in the warm parent
        # that every call's fork and exit pay for
        import hashlib

        response = hashlib.md5(bytes([ident & 0xFF]) + chap.secret.encode() + challenge).digest()
        reply = [("CHAP_N", chap.user), ("CHAP_R", "0x" + response.hex())]
        mine = b""
        my_id = 0
        if chap.in_user:
            my_id = os.urandom(1)[0]
            mine = os.urandom(16)
            reply += [("CHAP_I", str(my_id)), ("CHAP_C", "0x" + mine.hex())]
        keys, stage = self._login_pdu(what, STAGE_SECURITY, STAGE_OPERATIONAL, True, reply)
        if chap.in_user:
            got = dict(keys)
            expect = hashlib.md5(bytes([my_id]) + chap.in_secret.encode() + mine).digest()
            try:
                ok = (got.get("CHAP_N") == chap.in_user
                      and _chap_value(got.get("CHAP_R", "")) == expect)
            except ValueError:
                ok = False
            if not ok:
                raise ProbeError("ISCSI_CHAP_FAILED", what,
                                 "the target failed mutual CHAP (incoming user or secret)")
        return stage

    # --- after login -------------------------------------------------------------------

    def send_targets(self) -> list[Target]:
        """SendTargets=All on a discovery session."""
        found: list[Target] = []
        ttt = b"\xff\xff\xff\xff"
        keys: list[tuple[str, str]] = []
        data = _pack_keys([("SendTargets", "All")])
        for _ in range(64):
            bhs = bytearray(48)
            bhs[0] = OP_TEXT_REQ | IMMEDIATE
            bhs[1] = 0x80
            bhs[8:16] = b"\0" * 8
            bhs[16:20] = self._next_itt().to_bytes(4, "big")
            bhs[20:24] = ttt
            bhs[24:28] = self.cmdsn.to_bytes(4, "big")
            bhs[28:32] = self.expstatsn.to_bytes(4, "big")
            self._send(bhs, data)
            rsp, body = self._recv()
            if rsp[0] & 0x3F != OP_TEXT_RSP:
                raise ProbeError("ISCSI_PROTOCOL_ERROR", f"SendTargets at {self.where}",
                                 f"unexpected PDU {rsp[0]:#x}")
            keys += _keys(body)
            if rsp[1] & 0x80 and not rsp[1] & 0x40:
                break
            ttt, data = rsp[20:24], b""
        iqn = None
        for k, v in keys:
            if k == "TargetName":
                iqn = v
            elif k == "TargetAddress" and iqn:
                found.append(Target(v, iqn))
        return found

    def command(self, lun: int, cdb: bytes, alloc: int) -> tuple[int, bytes]:
        """Run a read (or no-data) SCSI command; (status, data).  A CHECK
        CONDITION (the unit attention a target reports after a login or a
        reset) is retried twice."""
        for _ in range(3):
            status, data = self._command(lun, cdb, alloc)
            if status != SCSI_CHECK_CONDITION:
                break
        return status, data

    def _command(self, lun: int, cdb: bytes, alloc: int) -> tuple[int, bytes]:
        bhs = bytearray(48)
        bhs[0] = OP_SCSI_CMD
        bhs[1] = 0x80 | (0x40 if alloc else 0) | 0x01
        bhs[8:16] = _lun_field(lun)
        itt = self._next_itt()
        bhs[16:20] = itt.to_bytes(4, "big")
        bhs[20:24] = alloc.to_bytes(4, "big")
        bhs[24:28] = self.cmdsn.to_bytes(4, "big")
        bhs[28:32] = self.expstatsn.to_bytes(4, "big")
        bhs[32:48] = cdb.ljust(16, b"\0")
        self.cmdsn += 1
        self._send(bhs)
        buf = bytearray(alloc)
        got = 0
        while True:
            rsp, data = self._recv()
            op = rsp[0] & 0x3F
            if int.from_bytes(rsp[16:20], "big") != itt:
                continue
            if op == OP_DATA_IN:
                off = int.from_bytes(rsp[40:44], "big")
                buf[off : off + len(data)] = data
                got = max(got, off + len(data))
                if rsp[1] & 0x01:
                    return rsp[3], bytes(buf[:got])
            elif op == OP_SCSI_RSP:
                return rsp[3], bytes(buf[:got])
            else:
                raise ProbeError("ISCSI_PROTOCOL_ERROR", f"SCSI command at {self.where}",
                                 f"unexpected PDU {op:#x}")

    def logout(self) -> None:
        bhs = bytearray(48)
        bhs[0] = OP_LOGOUT_REQ | IMMEDIATE
        bhs[1] = 0x80
        bhs[16:20] = self._next_itt().to_bytes(4, "big")
        bhs[24:28] = self.cmdsn.to_bytes(4, "big")
        bhs[28:32] = self.expstatsn.to_bytes(4, "big")
        with contextlib.suppress(ProbeError):
            self._send(bhs)
            self._recv()


# --- what the callers use ------------------------------------------------------------------


def split_portal(portal: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) -> (host, port)."""
    portal = portal.strip()
    if portal.startswith("["):
        host, _, rest = portal[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif portal.count(":") == 1:
        host, port = portal.split(":")
    else:
        host, port = portal, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ProbeError("ISCSI_BAD_PORTAL", f"portal {portal!r}", "port is not a number") from None


def discover(host: str, port: int = DEFAULT_PORT, chap: Chap | None = None,
             timeout: float = TIMEOUT) -> list[Target]:
    """The targets a portal offers (SendTargets on a discovery session)."""
    with Connection(host, port, timeout) as c:
        c.login(None, chap)
        targets = c.send_targets()
        c.logout()
    return targets


def probe_luns(host: str, port: int, iqn: str, chap: Chap | None = None,
               timeout: float = TIMEOUT) -> list[LunInfo]:
    """Every LUN of target ``iqn``: number, SCSI id, size, vendor, model, type."""
    with Connection(host, port, timeout) as c:
        c.login(iqn, chap)
        status, data = c.command(0, REPORT_LUNS, 4096)
        if status != SCSI_GOOD or len(data) < 8:
            raise ProbeError("ISCSI_PROBE_FAILED", f"REPORT LUNS of {iqn}", f"status {status:#x}")
        count = min(int.from_bytes(data[0:4], "big") // 8, (len(data) - 8) // 8)
        luns = []
        for i in range(count):
            entry = data[8 + 8 * i : 16 + 8 * i]
            method = entry[0] >> 6
            luns.append(((entry[0] & 0x3F) << 8 | entry[1]) if method == 1 else entry[1])
        out = [_lun_info(c, iqn, lun) for lun in sorted(set(luns))]
        c.logout()
    return out


def check_target(host: str, port: int, iqn: str, chap: Chap | None = None,
                 timeout: float = TIMEOUT) -> None:
    """Log in to ``iqn`` and out again: raises a clear ProbeError if it cannot."""
    with Connection(host, port, timeout) as c:
        c.login(iqn, chap)
        c.logout()


def _lun_info(c: Connection, iqn: str, lun: int) -> LunInfo:
    status, inq = c.command(lun, bytes([0x12, 0, 0, 0, 96, 0]), 96)
    if status != SCSI_GOOD or len(inq) < 36:
        raise ProbeError("ISCSI_PROBE_FAILED", f"INQUIRY of {iqn} LUN {lun}", f"status {status:#x}")
    dtype = inq[0] & 0x1F
    vendor = inq[8:16].decode("latin-1").strip()
    model = inq[16:32].decode("latin-1").strip()
    scsi_id = ""
    status, vpd = c.command(lun, bytes([0x12, 1, 0x83, 0x01, 0x00, 0]), 256)
    if status == SCSI_GOOD:
        with contextlib.suppress(ValueError):
            scsi_id = best_id(parse_designators(vpd)) or ""
    size = 0
    if dtype == TYPE_DISK:
        cdb = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
        status, cap = c.command(lun, cdb, 32)
        if status == SCSI_GOOD and len(cap) >= 12:
            size = (int.from_bytes(cap[0:8], "big") + 1) * int.from_bytes(cap[8:12], "big")
    return LunInfo(lun, scsi_id, size, vendor, model, dtype)
