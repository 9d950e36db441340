"""``PUT /data/<sr>/<vdi>``: the receiving end of a VDI.copy from another host.

Owns ``put(disp, path, headers, rfile) -> (HTTP status, body, content type)``
and ``Spool``, the directory uploads are spooled into:

1. ``sr`` and ``vdi`` must be safe names, ``sr`` an SR in the routing table;
   the caller (``client``: its certificate name over mutual TLS,
   ``dispatcher.httpd``) must hold the grant of that VDI: its own VDI.create
   made it, and it has not uploaded into it yet (``dispatcher.grants``; else
   403: from the Unix socket, from another peer, a second time);
   the body needs a Content-Length no larger than the VDI (asked with
   ``VDI.stat``) nor than ``Config.max_import``;
2. the body is streamed, holding one of the SR's plugin slots (the upload is a
   call like any other: it shows in ``Dispatcher.status`` with its progress,
   ``Dispatcher.cancel`` ends it), into a sparse file of the spool
   (all-zero 2 MiB chunks are skipped, so they stay holes).  The spool is on
   disk, under the state directory (``<state_dir>/import``, never the run
   directory: that is tmpfs, RAM, on a real host), and bounded: the bytes
   written by all uploads in flight stay under ``Config.max_spool`` and the
   spool's filesystem keeps ``Config.spool_reserve`` bytes free, else the
   upload ends with 507;
3. the SR's plugin gets ``VDI.import_raw {sr, vdi, path}``; its response is
   relayed with status 200; the file is removed whatever happens (and
   ``Spool.clean`` at start removes what a killed dispatcher left).

Errors before the plugin runs are plain-text answers: 400 (bad request),
404 (unknown SR or VDI), 413 (too large), 411 (no length), 500 (cannot
spool), 403 (not this caller's VDI), 502, 503 (no slot, no spool), 507
(spool full).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from smcommon import progress
from smcommon.errors import InvalidRequest
from smcommon.fileio import private_dir
from smcommon.paths import safe_name

from dispatcher import wire
from dispatcher.core import NoSlot

CHUNK = 2 << 20  # the VHD block size: an all-zero chunk is a block left unallocated
STATVFS_EVERY = 32  # chunks between two looks at the spool's free space
DBG_HEADER = "SM-Dbg"  # the sender's dbg, to name the upload in status and logs


class SpoolFull(Exception):
    pass


class Cancelled(Exception):
    pass


class Spool:
    """The upload spool: a directory, the bytes in it, and its bounds."""

    def __init__(self, directory: Path, limit: int, reserve: int) -> None:
        self.dir = directory
        self.limit = limit
        self.reserve = reserve
        self.used = 0
        self.uploads = 0
        self._lock = threading.Lock()

    def clean(self) -> None:
        """Remove the uploads a killed dispatcher left (call at start, before serving)."""
        if not self.dir.is_dir():
            return
        for f in self.dir.glob("*.raw"):
            with contextlib.suppress(OSError):
                f.unlink()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "dir": str(self.dir),
                "used": self.used,
                "uploads": self.uploads,
                "limit": self.limit,
                "reserve": self.reserve,
            }

    def _take(self, n: int, check_free: bool) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise SpoolFull(
                    f"the upload spool {self.dir} holds {self.used} bytes: "
                    f"{n} more would pass its limit of {self.limit} bytes"
                )
            self.used += n
        if check_free:
            st = os.statvfs(self.dir)
            free = st.f_bavail * st.f_frsize
            if free - n < self.reserve:
                self._give(n)
                raise SpoolFull(
                    f"the upload spool's filesystem ({self.dir}) has {free} bytes free, "
                    f"it keeps {self.reserve} free"
                )

    def _give(self, n: int) -> None:
        with self._lock:
            self.used -= n

    def receive(
        self,
        rfile: Any,
        spool: Path,
        length: int,
        tracker: progress.Tracker,
        cancelled: Any,
    ) -> int:
        """Copy ``length`` body bytes into the new sparse file ``spool``; the bytes received."""
        private_dir(self.dir)
        self._take(0, True)
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        got = taken = chunks = 0
        buf = bytearray(CHUNK)
        zero = bytes(CHUNK)
        with self._lock:
            self.uploads += 1
        try:
            while got < length:
                if cancelled():
                    raise Cancelled
                view = memoryview(buf)[: min(CHUNK, length - got)]
                n = 0
                while n < len(view):
                    r = rfile.readinto(view[n:])
                    if not r:
                        break
                    n += r
                if n == 0:
                    break
                if (buf != zero) if n == CHUNK else (bytes(view[:n]) != zero[:n]):
                    chunks += 1
                    self._take(n, chunks % STATVFS_EVERY == 1)
                    taken += n
                    os.pwrite(fd, view[:n], got)
                got += n
                tracker.set(got)
                if n < len(view):
                    break
            os.ftruncate(fd, got)
        finally:
            os.close(fd)
            self._give(taken)
            with self._lock:
                self.uploads -= 1
        return got


def put(
    disp: Any,
    path: str,
    headers: Any,
    rfile: io.BufferedIOBase,
    dbg: str = "put",
    client: str = "",
) -> tuple[int, bytes, str]:
    """The HTTP status, body and content type answering one PUT from ``client``."""
    length: int | None = None
    if "chunked" not in headers.get("Transfer-Encoding", "").lower():
        with contextlib.suppress(ValueError):
            length = int(headers.get("Content-Length", ""))
        if length is not None and length < 0:
            length = None
    sent_dbg = headers.get(DBG_HEADER, "")
    if sent_dbg and sent_dbg.isprintable() and len(sent_dbg) <= 200:
        dbg = sent_dbg
    parts = path.split("?", 1)[0].strip("/").split("/")
    if len(parts) != 3 or parts[0] != "data":
        return 404, b"PUT only /data/<sr>/<vdi>\n", "text/plain"
    try:
        sr = safe_name("sr", parts[1])
        vdi = safe_name("vdi", parts[2])
    except InvalidRequest as e:
        return 400, f"{e}\n".encode(), "text/plain"
    if length is None:
        return 411, b"a valid Content-Length is required\n", "text/plain"
    if not client or client.startswith("unix:"):
        return 403, b"uploads come from peers, over TCP\n", "text/plain"
    if not disp.grants.take(sr, vdi, client):  # one upload per VDI.create
        msg = (
            f"VDI {vdi} of SR {sr} was not made by a VDI.create of {client} "
            "(or its data came already): no upload into it\n"
        )
        return 403, msg.encode(), "text/plain"
    sr_type = disp.routes.get(sr)
    if sr_type is None:
        return 404, f"SR {sr} is not known to this dispatcher\n".encode(), "text/plain"
    config = disp.config
    spool: Spool | None = disp.spool
    if spool is None:
        return (
            503,
            b"this dispatcher takes no uploads (no spool directory)\n",
            "text/plain",
        )
    if length > config.max_import:
        msg = f"the body is {length} bytes, more than the limit of {config.max_import} bytes\n"
        return 413, msg.encode(), "text/plain"
    out, _ = disp.handle(
        sr_type, wire.dumps_call("VDI.stat", {"dbg": dbg, "sr": sr, "vdi": vdi})
    )
    try:
        resp = wire.parse_response(out)
    except wire.WireError as e:
        return 502, f"VDI.stat gave no valid response: {e}\n".encode(), "text/plain"
    if resp.status != "Success":
        desc = " ".join(str(d) for d in (resp.error or [str(resp.fault)]))
        return 404, f"VDI {vdi} of SR {sr}: {desc}\n".encode(), "text/plain"
    size = resp.value["Value"].get("virtual_size")
    if not isinstance(size, int) or length > size:
        msg = f"the body is {length} bytes, larger than VDI {vdi} ({size} bytes)\n"
        return 413, msg.encode(), "text/plain"
    spooled = spool.dir / f"{sr}.{vdi}.{uuid.uuid4().hex}.raw"
    try:
        try:
            with disp.slot(dbg, "PUT /data", sr, sr_type) as rec:
                rec.state = "receiving"
                tracker = progress.Tracker("receive", length, _path(rec.progress_file))
                with tracker:
                    got = spool.receive(
                        rfile, spooled, length, tracker, lambda: bool(rec.cancel_reason)
                    )
        except NoSlot as e:
            return 503, f"{e}\n".encode(), "text/plain"
        except SpoolFull as e:
            return 507, f"{e}\n".encode(), "text/plain"
        except Cancelled:
            return 503, b"the upload was cancelled\n", "text/plain"
        except OSError as e:
            msg = f"cannot spool the upload into {spool.dir}: {e}\n"
            return 500, msg.encode(), "text/plain"
        if got != length:
            msg = f"the body ended after {got} of {length} bytes\n"
            return 400, msg.encode(), "text/plain"
        call = wire.dumps_call(
            "VDI.import_raw", {"dbg": dbg, "sr": sr, "vdi": vdi, "path": str(spooled)}
        )
        out, _ = disp.handle(sr_type, call)
        return 200, out, "text/xml"
    finally:
        with contextlib.suppress(FileNotFoundError):
            spooled.unlink()


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)
