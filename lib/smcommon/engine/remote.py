"""VDI.copy to another host: the sending side and the receiving plugin's import.

Sending (``copy_to_remote``): ``url`` names the other host's dispatcher
(``https://HOST:PORT/``), which must be a peer listed in this host's
``pool.json`` (``smcommon.pool``; any other URL is ``REMOTE_NOT_A_PEER``).
Every connection is mutual TLS: this host's certificate presented, the
peer's verified against the pool's CA and required to carry the peer's
``cert_name``.  Steps: ``VDI.create`` on SR ``dest``
through ``<url>`` (routed by sr) with the source's name_label, description
and virtual_size; then one HTTP ``PUT <url>/data/<dest>/<vdi>`` whose body is
the VDI's raw virtual disk (Content-Length = virtual size), read from the
chain in CHUNK pieces; the remote dispatcher hands the file it received to
``VDI.import_raw``.  On any failure after the create, the remote VDI is
destroyed (best effort) and the caller gets ``Backend_error
REMOTE_COPY_FAILED`` naming the remote and the step that failed.  Every
socket operation has a bounded timeout.

Receiving (``import_raw``, the ext driver's extra method ``VDI.import_raw``):
writes the non-zero blocks of a raw file into an *empty* VDI's leaf (all-zero
blocks stay unallocated), under the SR and VDI locks.  Only regular files
under ``<state_dir>/import`` (where the dispatcher spools uploads) are read,
and never one larger than the VDI.
"""

from __future__ import annotations

import http.client
import os
import stat
import urllib.parse
from pathlib import Path

from smcommon import progress, rpc
from smcommon.errors import BackendError, InvalidRequest
from smcommon.paths import Paths, safe_name
from smcommon.pool import PoolConfig, origin

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHUNK = 8 << 20  # bytes per read of the source and per send
BATCH = 8  # new blocks per allocation (one pair of fdatasyncs each)
CONNECT_TIMEOUT = 10.0  # seconds to connect
IO_TIMEOUT = 120.0  # seconds any one send/receive may stall
IMPORT_RATE = 20e6  # bytes/s the remote's import is granted before we give up
MAX_REPLY = 1 << 20  # a reply to create/destroy/PUT is a few KiB


def import_dir(paths: Paths) -> Path:
    """Where the dispatcher spools uploads; the only place import_raw reads.
    On disk (the state directory), not the run directory: that is RAM on a host."""
    return paths.state_dir / "import"


# --- the sending side ----------------------------------------------------------


class _PeerConnection(http.client.HTTPConnection):
    """HTTPS to a peer: its certificate verified against the pool's CA and
    required to carry the peer's name (not the URL's host); ours presented."""

    def __init__(self, host: str, port: int, context: Any, cert_name: str) -> None:
        super().__init__(host, port, timeout=CONNECT_TIMEOUT)
        self._context = context
        self._cert_name = cert_name

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._cert_name)


class _Remote:
    """One peer's dispatcher: XML-RPC calls and the data PUT, bounded in time."""

    def __init__(self, url: str, pool: PoolConfig, dbg: str = "") -> None:
        self.dbg = "".join(c for c in dbg[:200] if c.isprintable()) or "remote-copy"
        self.peer = pool.peer(url)  # REMOTE_NOT_A_PEER for any other URL
        scheme, self.host, self.port = origin(url)
        # an http peer is a benchmark's on loopback, marked insecure (pool.py)
        self.context = pool.client_context() if scheme == "https" else None
        self.url = url
        self.base = urllib.parse.urlparse(url).path.rstrip("/")

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.context is not None:
            conn = _PeerConnection(self.host, self.port, self.context, self.peer.cert_name)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(IO_TIMEOUT)
        return conn

    def call(self, method: str, args: dict[str, Any]) -> Any:
        """The Value of a successful call; BackendError otherwise."""
        body = rpc.dumps_call(method, args)
        conn = self._conn()
        try:
            conn.request("POST", self.base + "/", body, {"Content-Type": "text/xml"})
            resp = conn.getresponse()
            data = resp.read(MAX_REPLY + 1)
        finally:
            conn.close()
        if resp.status != 200:
            raise _fail(f"{method} answered HTTP {resp.status}: {_text(data)}")
        return _value(method, data)

    def put(self, sr: str, vdi: str, size: int, reader: Any) -> Any:
        """Stream ``size`` bytes from ``reader(offset, n)`` to /data/<sr>/<vdi>."""
        conn = self._conn()
        try:
            conn.putrequest("PUT", f"{self.base}/data/{sr}/{vdi}")
            conn.putheader("Content-Length", str(size))
            conn.putheader("SM-Dbg", self.dbg)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.endheaders()
            pos = 0
            assert conn.sock is not None
            with progress.track("copy", size) as done:
                while pos < size and not _answered(conn.sock):
                    n = min(CHUNK, size - pos)
                    try:
                        conn.send(reader(pos, n))
                    except OSError:
                        if not _answered(conn.sock):
                            raise
                        break  # it answered early (a refusal): read why
                    pos += n
                    done.set(pos)
            # the remote imports the whole body before it answers
            conn.sock.settimeout(IO_TIMEOUT + size / IMPORT_RATE)
            resp = conn.getresponse()
            data = resp.read(MAX_REPLY + 1)
        finally:
            conn.close()
        if resp.status != 200:
            raise _fail(f"PUT of the data answered HTTP {resp.status}: {_text(data)}")
        return _value("VDI.import_raw", data)


def _answered(sock: Any) -> bool:
    """Whether the remote has something to say before the body is all sent
    (it refused the upload: 507 spool full, 413 ...)."""
    import select

    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _text(data: bytes) -> str:
    return data[:500].decode("utf-8", "replace").strip()


def _fail(what: str) -> BackendError:
    return BackendError("REMOTE_COPY_FAILED", [what])


def _value(method: str, data: bytes) -> Any:
    try:
        parsed = rpc.parse_response(data, MAX_REPLY)
    except InvalidRequest as e:
        raise _fail(f"{method}: unreadable reply ({e.reason})") from None
    if parsed.fault is not None:
        raise _fail(f"{method} faulted: {parsed.fault[1]}")
    reply = parsed.value
    if not isinstance(reply, dict) or reply.get("Status") not in ("Success", "Failure"):
        raise _fail(f"{method}: the reply is no {{Status: ...}} struct")
    if reply["Status"] == "Failure":
        desc = reply.get("ErrorDescription") or []
        raise _fail(f"{method} failed: {' '.join(str(d) for d in desc)}")
    return reply.get("Value")


def copy_to_remote(eng: Any, vdi: str, url: str, dest: str, dbg: str) -> str:
    """Copy VDI ``vdi`` of ``eng`` into SR ``dest`` of the host ``url`` names."""
    from smcommon.vhd.image import open_image

    dest = safe_name("dest", dest)
    remote = _Remote(url, PoolConfig.load(eng.paths), dbg)
    rec = eng.get(vdi)
    with eng.vdi_lock(rec.vdi):
        rec = eng.get(vdi)
        with eng.store.held(rec.volume) as leaf, open_image(leaf) as img:
            size = img.virtual_size
            info = {
                "name_label": rec.name_label,
                "name_description": rec.name_description,
                "ty": rec.ty,
                "virtual_size": size,
                "sm_config": {},
            }
            where = f"the remote {url} (SR {dest})"
            try:
                new = remote.call(
                    "VDI.create", {"dbg": dbg, "sr": dest, "vdi_info": info}
                )
            except OSError as e:
                raise _fail(f"cannot reach {where} to create the VDI: {e}") from None
            except BackendError as e:
                raise _fail(f"{where}: {e.details[0] if e.details else e}") from None
            key = new.get("vdi") if isinstance(new, dict) else None
            if not isinstance(key, str):
                raise _fail(f"{where}: VDI.create answered no VDI key: {new!r}")
            try:
                safe_name("vdi", key)

                def reader(pos: int, n: int) -> bytearray:
                    # a new (zeroed) buffer each time: read_into leaves the
                    # bytes of unallocated blocks as they are
                    buf = bytearray(n)
                    img.read_into(memoryview(buf), pos)
                    return buf

                remote.put(dest, key, size, reader)
            except BaseException as e:
                _destroy_quietly(remote, dbg, dest, key)
                if isinstance(e, BackendError) and e.code == "REMOTE_COPY_FAILED":
                    raise _fail(
                        f"{where}, VDI {key} (destroyed): {e.details[0]}"
                    ) from None
                if isinstance(e, (OSError, http.client.HTTPException)):
                    raise _fail(
                        f"sending the data to {where}, VDI {key} (destroyed), failed: {e}"
                    ) from None
                raise
    return key


def _destroy_quietly(remote: _Remote, dbg: str, sr: str, vdi: str) -> None:
    import logging

    try:
        remote.call("VDI.destroy", {"dbg": dbg, "sr": sr, "vdi": vdi})
    except Exception as e:  # noqa: BLE001 - best effort: the first failure is what matters
        logging.getLogger(__name__).warning(
            "could not destroy VDI %s of SR %s at %s: %s", vdi, sr, remote.url, e
        )


# --- the receiving side ----------------------------------------------------------


def import_raw(eng: Any, vdi: str, path: str) -> int:
    """Write raw file ``path``'s non-zero blocks into empty VDI ``vdi``; bytes written."""
    from smcommon.vhd import format as fmt
    from smcommon.vhd.image import open_image

    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must be a non-empty string")
    root = import_dir(eng.paths).resolve()
    full = Path(os.path.abspath(path))
    if full.parent.resolve() != root or full.name.startswith("."):
        raise InvalidRequest(f"path {path!r} is not a file directly under {root}")
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidRequest(f"cannot open {path!r}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(f"{path!r} is not a regular file")
        size = st.st_size
        with eng.tree_lock():
            rec = eng.get(vdi)
            with eng.vdi_lock(rec.vdi):
                eng._require_unused(rec.vdi, "import into")
                with eng.store.held(rec.volume, write=True) as leaf, open_image(
                    leaf, writable=True
                ) as img:
                    if size > img.virtual_size:
                        raise InvalidRequest(
                            f"the raw file is {size} bytes, larger than VDI {rec.vdi} "
                            f"({img.virtual_size} bytes)"
                        )
                    if (
                        img.is_fixed
                        or img.parent is not None
                        or img.bat is None
                        or list(img.bat.allocated())
                    ):
                        raise BackendError(
                            "VDI_NOT_EMPTY",
                            [
                                f"VDI {rec.vdi} already holds data: import only into a new VDI"
                            ],
                        )
                    return _write_blocks(img, fd, size, fmt.BLOCK_SIZE)
    finally:
        os.close(fd)


def _write_blocks(img: Any, fd: int, size: int, bs: int) -> int:
    zero = bytes(bs)
    pending: list[tuple[int, int, bytes, int | None]] = []
    written = 0
    with progress.track("import", size) as done:
        for block in range((size + bs - 1) // bs):
            done.set(block * bs)
            data = os.pread(fd, bs, block * bs)
            if not data or data == zero[: len(data)]:
                continue
            written += len(data)
            if len(data) < bs:  # the short tail: sector-merged by write()
                img.write(block * bs, data)
                continue
            pending.append((block, 0, data, -1))
            if len(pending) >= BATCH:
                img.allocate_blocks(pending)
                pending = []
        if pending:
            img.allocate_blocks(pending)
    return written
