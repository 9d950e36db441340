"""``PUT /data/<sr>/<vdi>``: the receiving end of a VDI.copy from another host.

Owns ``put(disp, path, length, rfile) -> (HTTP status, body, content type)``:

1. ``sr`` and ``vdi`` must be safe names, ``sr`` an SR in the routing table;
   the body needs a Content-Length no larger than the VDI (asked with
   ``VDI.stat``) nor than ``Config.max_import``;
2. the body is streamed into a sparse file under ``Config.import_dir``
   (all-zero 2 MiB chunks are skipped, so they stay holes);
3. the SR's plugin gets ``VDI.import_raw {sr, vdi, path}``; its response is
   relayed with status 200; the file is removed whatever happens (and
   ``clean_spool`` at start removes what a killed dispatcher left).

Errors before the plugin runs are plain-text answers: 400 (bad request),
404 (unknown SR or VDI), 413 (too large), 411 (no length), 500 (cannot
spool), 502/503.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path
from typing import Any

from smcommon.errors import InvalidRequest
from smcommon.paths import safe_name

from dispatcher import wire

CHUNK = 2 << 20  # the VHD block size: an all-zero chunk is a block left unallocated


def put(
    disp: Any, path: str, headers: Any, rfile: io.BufferedIOBase, dbg: str = "put"
) -> tuple[int, bytes, str]:
    """The HTTP status, body and content type answering one PUT."""
    length: int | None = None
    if "chunked" not in headers.get("Transfer-Encoding", "").lower():
        with contextlib.suppress(ValueError):
            length = int(headers.get("Content-Length", ""))
        if length is not None and length < 0:
            length = None
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
    sr_type = disp.routes.get(sr)
    if sr_type is None:
        return 404, f"SR {sr} is not known to this dispatcher\n".encode(), "text/plain"
    config = disp.config
    if config.import_dir is None:
        return (
            503,
            b"this dispatcher takes no uploads (no import directory)\n",
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
    spool = config.import_dir / f"{sr}.{vdi}.{uuid.uuid4().hex}.raw"
    try:
        try:
            config.import_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            got = _receive(rfile, spool, length)
        except OSError as e:
            msg = f"cannot spool the upload into {config.import_dir}: {e}\n"
            return 500, msg.encode(), "text/plain"
        if got != length:
            msg = f"the body ended after {got} of {length} bytes\n"
            return 400, msg.encode(), "text/plain"
        call = wire.dumps_call(
            "VDI.import_raw", {"dbg": dbg, "sr": sr, "vdi": vdi, "path": str(spool)}
        )
        out, _ = disp.handle(sr_type, call)
        return 200, out, "text/xml"
    finally:
        with contextlib.suppress(FileNotFoundError):
            spool.unlink()


def clean_spool(import_dir: Path | None) -> None:
    """Remove the uploads a killed dispatcher left (call at start, before serving)."""
    if import_dir is None or not import_dir.is_dir():
        return
    for f in import_dir.glob("*.raw"):
        with contextlib.suppress(OSError):
            f.unlink()


def _receive(rfile: io.BufferedIOBase, spool: os.PathLike[str], length: int) -> int:
    """Copy ``length`` body bytes into a new sparse file; the bytes received."""
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    got = 0
    buf = bytearray(CHUNK)
    zero = bytes(CHUNK)
    try:
        while got < length:
            view = memoryview(buf)[: min(CHUNK, length - got)]
            n = 0
            while n < len(view):
                r = rfile.readinto(view[n:])  # type: ignore[attr-defined]
                if not r:
                    break
                n += r
            if n == 0:
                break
            if (buf != zero) if n == CHUNK else (bytes(view[:n]) != zero[:n]):
                os.pwrite(fd, view[:n], got)
            got += n
            if n < len(view):
                break
        os.ftruncate(fd, got)
    finally:
        os.close(fd)
    return got
