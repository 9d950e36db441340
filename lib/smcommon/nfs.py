"""NFS servers from the client side: the probe, the export listing, the
mount options, and what the tools' failures mean.

This module owns the NFS client tools' command lines and the reading of their
output: ``rpcinfo`` (an RPC NULL call: is the NFS service answering?),
``showmount -e`` (the NFSv3 export list), ``nfs-ls`` (libnfs-utils: list a
directory over NFS itself, as a mount would see it) and the ``-o`` options of
``mount -t nfs``.  Everything runs through the one runner with a short
timeout, so a dead, silent or refusing server is reported within seconds,
naming the server, the port and the path, never after the minutes a default
``mount.nfs`` spends retrying.

- ``probe(server)``: the NFS program of the wanted version answers a NULL
  call (directly on the NFS port for NFSv4 or a given port; through rpcbind
  otherwise), and for NFSv3 the MOUNT program too.  Failures are
  ``ServerUnreachable`` (no route, refused connection, no answer within the
  timeout) or ``NfsServiceMissing`` (the host answers, the NFS service of that
  version does not).
- ``exports(server)``: ``showmount -e`` as a list of ``Export``.
- ``list_dir(server, path)``: ``nfs-ls`` of ``path`` on the server; a path that
  is not there is ``ExportMissing``, one the server refuses is ``MountRefused``.
- ``mount_options(version, port, extra)``: ``soft`` with bounded
  ``timeo``/``retrans``, ``retry=0`` (without it mount.nfs retries in the
  foreground for two minutes), plus the extra options a user may give
  (``parse_options``: an allow-list).
- ``mount_failure(text)``: the error for mount.nfs's own words.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

from smcommon.errors import BackendError, CommandError, CommandTimeout
from smcommon.record import record

VERSIONS = ("3", "4", "4.0", "4.1", "4.2")
DEFAULT_VERSION = "3"
NFS_PORT = 2049
RPCBIND_PORT = 111
PROBE_TIMEOUT = 4.0  # seconds for each probe command
LIST_TIMEOUT = 6.0
RESOLVE_TIMEOUT = 3.0
# soft mounts: an operation the server does not answer fails after about
# timeo * (1 + 2 + ... + (retrans + 1)) deciseconds (linear back-off over TCP)
TIMEO = 20
RETRANS = 2
TIMEO_RANGE = (5, 600)
RETRANS_RANGE = (1, 5)

Runner = Callable[..., object]


# --- errors --------------------------------------------------------------------


class ServerUnreachable(BackendError):
    """No answer from the server: no route, a refused connection, a timeout."""

    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("NFS_SERVER_UNREACHABLE", details)


class NfsServiceMissing(BackendError):
    """The host answers but its NFS service (of that version) does not."""

    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("NFS_SERVICE_UNAVAILABLE", details)


class ExportMissing(BackendError):
    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("NFS_EXPORT_MISSING", details)


class MountRefused(BackendError):
    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("NFS_MOUNT_REFUSED", details)


class BadOption(BackendError):
    def __init__(self, why: str) -> None:
        super().__init__("DEVICE_CONFIG_INVALID", [f"options: {why}"])


# --- the server ------------------------------------------------------------------


@record(frozen=True)
class Server:
    """An NFS server as device_config names it."""

    host: str  # a name or an address literal
    version: str = DEFAULT_VERSION
    port: int | None = None  # the NFS port; None: 2049 (v4) or rpcbind's (v3)

    @property
    def v4(self) -> bool:
        return self.version.startswith("4")

    @property
    def nfs_port(self) -> int | None:
        return self.port if self.port is not None else (NFS_PORT if self.v4 else None)

    def where(self, path: str | None = None) -> str:
        """``server HOST port P[, path PATH]`` for messages."""
        port = self.nfs_port
        text = f"NFS server {self.host} port {port if port is not None else 'from rpcbind'}"
        return text + (f", path {path}" if path is not None else "")

    def source(self, path: str) -> str:
        """``host:/path`` as mount.nfs takes it (IPv6 literals in brackets)."""
        return f"{_bracket(self.host)}:{path}"

    def url(self, path: str) -> str:
        """The libnfs URL of ``path`` on this server."""
        args = []
        if self.v4:
            args.append("version=4")
        if self.port is not None:
            args.append(f"nfsport={self.port}")
        return f"nfs://{_bracket(self.host)}{path}" + ("?" + "&".join(args) if args else "")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _run(runner: Runner | None) -> Runner:
    if runner is None:
        from smcommon.runner import run

        return run
    return runner


def resolve(host: str, runner: Runner | None = None, timeout: float = RESOLVE_TIMEOUT) -> str:
    """The address of ``host`` (a literal is its own); bounded (``getent``)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        res = _run(runner)(["getent", "ahosts", host], timeout=timeout)
    except CommandTimeout:
        raise ServerUnreachable(
            [f"NFS server {host}: name not resolved within {timeout:g}s"]
        ) from None
    except CommandError:
        raise ServerUnreachable([f"NFS server {host}: unknown host name"]) from None
    for line in getattr(res, "out", "").splitlines():
        parts = line.split()
        if parts:
            return parts[0]
    raise ServerUnreachable([f"NFS server {host}: unknown host name"])


def uaddr(address: str, port: int) -> str:
    """An RPC universal address: ``a.b.c.d.p1.p2``."""
    return f"{address}.{port >> 8}.{port & 255}"


def _netid(address: str) -> str:
    return "tcp6" if ":" in address else "tcp"


def probe_argv(address: str, program: str, version: str, port: int | None) -> list[str]:
    """rpcinfo's NULL call to ``program``: straight to ``port`` when known
    (no rpcbind involved: NFSv4 servers need none), else through rpcbind."""
    vers = "4" if version.startswith("4") else version
    if port is not None:
        return ["rpcinfo", "-a", uaddr(address, port), "-T", _netid(address), program, vers]
    return ["rpcinfo", "-T", _netid(address), address, program, vers]


@record(frozen=True)
class Probe:
    address: str
    answered: list[str]  # what answered, e.g. "nfs 4 on port 2049"


def probe(
    server: Server,
    runner: Runner | None = None,
    timeout: float = PROBE_TIMEOUT,
    mount_service: bool = True,
) -> Probe:
    """Check that the NFS service answers, and for an NFSv3 mount
    (``mount_service``) the MOUNT service too."""
    run = _run(runner)
    address = resolve(server.host, run)
    answered = []
    steps = [("nfs", server.nfs_port)]
    if mount_service and not server.v4:
        steps.append(("mountd", None))
    for program, port in steps:
        argv = probe_argv(address, program, server.version, port)
        shown_port = port if port is not None else RPCBIND_PORT
        try:
            run(argv, timeout=timeout)
        except CommandTimeout:
            raise ServerUnreachable(
                [
                    (
                        f"{server.where()}: no answer to an RPC NULL call ({program}) "
                        f"on port {shown_port} within {timeout:g}s (host down or not answering)"
                    )
                ]
            ) from None
        except CommandError as e:
            raise _rpc_failure(server, program, shown_port, e) from None
        answered.append(
            f"{program} {'4' if server.v4 else '3'} on port "
            + (str(port) if port is not None else "from rpcbind")
        )
    return Probe(address, answered)


def _rpc_failure(server: Server, program: str, port: int, e: CommandError) -> BackendError:
    text = (e.err + " " + e.out).strip()
    where = f"{server.where()}: {program} on port {port}"
    if "Connection refused" in text:
        return ServerUnreachable([f"{where}: connection refused (nothing listens there)"])
    if "No route to host" in text:
        return ServerUnreachable([f"{where}: no route to host (host down?)"])
    if "timed out" in text.lower():
        return ServerUnreachable([f"{where}: connection timed out"])
    if "Program not registered" in text:
        return NfsServiceMissing(
            [f"{where}: rpcbind answers but {program} is not registered (NFS server down?)"]
        )
    m = re.search(r"low version = (\d+), high version = (\d+)", text)
    if m:
        return NfsServiceMissing(
            [
                (
                    f"{where}: NFS version {server.version} is not served "
                    f"(versions {m.group(1)} to {m.group(2)} are)"
                )
            ]
        )
    return NfsServiceMissing([f"{where}: {text or f'rpcinfo exit code {e.rc}'}"])


# --- exports ---------------------------------------------------------------------


@record(frozen=True)
class Export:
    path: str
    clients: tuple[str, ...]


def parse_showmount(text: str) -> list[Export]:
    """``showmount -e`` output (with or without its header line)."""
    out = []
    for line in text.splitlines():
        if not line.startswith("/"):
            continue  # "Export list for HOST:"
        parts = line.split()
        clients = tuple(c for p in parts[1:] for c in p.split(",") if c)
        out.append(Export(parts[0], clients))
    return out


def exports(
    server: Server, runner: Runner | None = None, timeout: float = PROBE_TIMEOUT
) -> list[Export]:
    """The server's NFSv3 export list (MOUNT protocol, through rpcbind)."""
    run = _run(runner)
    address = resolve(server.host, run)
    try:
        res = run(["showmount", "--no-headers", "-e", address], timeout=timeout)
    except CommandTimeout:
        raise ServerUnreachable(
            [f"{server.where()}: no export list within {timeout:g}s"]
        ) from None
    except CommandError as e:
        text = e.err_tail
        if "Program not registered" in text:
            raise NfsServiceMissing(
                [f"{server.where()}: no MOUNT service registered with rpcbind (port 111)"]
            ) from None
        raise ServerUnreachable([f"{server.where()}: showmount: {text}"]) from None
    return parse_showmount(getattr(res, "out", ""))


def covering(exps: Sequence[Export], path: str) -> Export | None:
    """The export ``path`` lies in (the longest match), or None."""
    best = None
    for e in exps:
        root = e.path.rstrip("/") or "/"
        inside = path == root or path.startswith(root.rstrip("/") + "/")
        if inside and (best is None or len(root) > len(best.path)):
            best = e
    return best


def list_dir(
    server: Server, path: str, runner: Runner | None = None, timeout: float = LIST_TIMEOUT
) -> list[str]:
    """The names in directory ``path`` on the server, read over NFS (nfs-ls)."""
    run = _run(runner)
    try:
        res = run(["nfs-ls", server.url(path)], timeout=timeout)
    except CommandTimeout:
        raise ServerUnreachable(
            [f"{server.where(path)}: no answer to nfs-ls within {timeout:g}s"]
        ) from None
    except CommandError as e:
        raise libnfs_failure(server, path, e.err_tail) from None
    names = []
    for line in getattr(res, "out", "").splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6:
            names.append(parts[5])
    return names


def libnfs_failure(server: Server, path: str, text: str) -> BackendError:
    """The error for libnfs's (nfs-ls, nfs-cat) words."""
    where = server.where(path)
    if "NFS4ERR_NOENT" in text or "NFS3ERR_NOENT" in text:
        return ExportMissing([f"{where}: no such directory on the server"])
    if "MNT3ERR_NOENT" in text:
        return ExportMissing([f"{where}: not exported by the server"])
    if "MNT3ERR_ACCES" in text or "ERR_ACCES" in text or "ERR_PERM" in text:
        return MountRefused(
            [f"{where}: the server refuses access (not exported to this host, or missing)"]
        )
    if "WRONGSEC" in text:
        return MountRefused([f"{where}: the server wants another security flavour"])
    if "Failed to start connection" in text or "nfs_service failed" in text:
        return ServerUnreachable([f"{where}: cannot connect ({text.strip()})"])
    return MountRefused([f"{where}: the server refused the mount ({text.strip() or 'nfs-ls failed'})"])


# --- mount options ---------------------------------------------------------------

_INT = re.compile(r"[0-9]{1,9}")
# extra options a user may give, and the values they take
_FLAGS = frozenset(
    {
        "noatime", "atime", "nodiratime", "relatime", "strictatime", "noac", "ac",
        "cto", "nocto", "sync", "async", "rdirplus", "nordirplus", "sharecache",
        "nosharecache", "resvport", "noresvport", "fsc", "nofsc", "intr", "nointr",
    }
)  # fmt: skip
_VALUES: dict[str, tuple[int, int] | tuple[str, ...]] = {
    "rsize": (1024, 1 << 20),
    "wsize": (1024, 1 << 20),
    "acregmin": (0, 3600),
    "acregmax": (0, 3600),
    "acdirmin": (0, 3600),
    "acdirmax": (0, 3600),
    "actimeo": (0, 3600),
    "nconnect": (1, 16),
    "timeo": TIMEO_RANGE,
    "retrans": RETRANS_RANGE,
    "sec": ("sys", "krb5", "krb5i", "krb5p"),
    "lookupcache": ("all", "none", "pos", "positive"),
    "proto": ("tcp", "tcp6"),
}
# refused, and why
_REFUSED = {
    "hard": "hard mounts hang forever on a dead server; SR mounts are soft",
    "nolock": "locks would stay on this host; hosts sharing the SR lock on the server",
    "local_lock": "locks would stay on this host; hosts sharing the SR lock on the server",
    "retry": "retry is 0 so a dead server fails the mount in seconds",
    "bg": "the mount must be there when SR.attach answers",
    "fg": "mounts are in the foreground already",
    "vers": "use the nfsversion key",
    "nfsvers": "use the nfsversion key",
    "minorversion": "use the nfsversion key (4.0, 4.1, 4.2)",
    "port": "use the port key",
    "ro": "an SR is mounted read-write",
    "rw": "an SR is mounted read-write already",
    "soft": "SR mounts are soft already",
    "softerr": "SR mounts are soft",
    "udp": "SR mounts use TCP",
    "tcp": "SR mounts use TCP already",
    "remount": "not a mount option of an SR",
}
_ALLOWED = sorted(_FLAGS | set(_VALUES))


def parse_options(text: str) -> list[str]:
    """Validate the ``options`` device_config value: a comma-separated list
    of allowed NFS mount options; BadOption naming the first offender."""
    if not isinstance(text, str):
        raise BadOption("must be a string")
    out: list[str] = []
    seen: set[str] = set()
    for raw in text.split(","):
        opt = raw.strip()
        if not opt:
            continue
        key, sep, value = opt.partition("=")
        if key in _REFUSED:
            raise BadOption(f"{key!r} is not allowed: {_REFUSED[key]}")
        if key in seen:
            raise BadOption(f"{key!r} is given twice")
        seen.add(key)
        if key in _FLAGS and not sep:
            out.append(key)
            continue
        rule = _VALUES.get(key)
        if rule is None or not sep:
            shown = opt if len(opt) <= 40 and opt.isprintable() else "an option"
            raise BadOption(
                f"{shown!r} is not an allowed mount option (allowed: {', '.join(_ALLOWED)}; "
                "value options as key=value)"
            )
        if isinstance(rule[0], int):
            lo, hi = rule  # type: ignore[misc]
            if not _INT.fullmatch(value) or not lo <= int(value) <= hi:
                raise BadOption(f"{key} must be a whole number from {lo} to {hi}")
            out.append(f"{key}={int(value)}")
        else:
            if value not in rule:
                raise BadOption(f"{key} must be one of {', '.join(rule)}")  # type: ignore[arg-type]
            out.append(f"{key}={value}")
    return out


def mount_options(version: str, port: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ``-o`` options of an SR's NFS mount, in a fixed order:
    ``vers, soft, timeo, retrans, proto, retry=0[, port][, extras]``
    (``timeo``, ``retrans`` and ``proto`` may be overridden by ``extra``)."""
    if version not in VERSIONS:
        raise ValueError(f"NFS version {version!r} is not one of {VERSIONS}")
    given = {o.partition("=")[0]: o for o in extra}
    opts = [
        f"vers={version}",
        "soft",
        given.pop("timeo", f"timeo={TIMEO}"),
        given.pop("retrans", f"retrans={RETRANS}"),
        given.pop("proto", "proto=tcp"),
        "retry=0",
    ]
    if port is not None:
        opts.append(f"port={port}")
    return opts + [o for o in extra if o.partition("=")[0] in given]


def mount_failure(server: Server, path: str, text: str) -> BackendError:
    """The error for mount.nfs's own words (see the captures)."""
    where = server.where(path)
    if "reason given by server: No such file or directory" in text:
        return ExportMissing([f"{where}: no such directory on the server"])
    if "access denied by server" in text:
        return MountRefused(
            [f"{where}: access denied by the server (not exported to this host, or missing)"]
        )
    if "Connection refused" in text:
        return ServerUnreachable([f"{where}: connection refused"])
    if "No route to host" in text:
        return ServerUnreachable([f"{where}: no route to host (host down?)"])
    if "timed out" in text:
        return ServerUnreachable([f"{where}: connection timed out"])
    if "version or transport protocol is not supported" in text:
        return NfsServiceMissing(
            [f"{where}: NFS version {server.version} over TCP is not served (NFS server down?)"]
        )
    if "incorrect mount option" in text:
        return BackendError("MOUNT_FAILED", [f"{where}: mount.nfs refused an option", text])
    return BackendError("MOUNT_FAILED", [f"{where}: {text.strip() or 'mount failed'}"])
