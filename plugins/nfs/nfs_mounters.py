"""The mount seam of the nfs SR type: the kernel's NFS client, or the
development mode for kernels without one.

``choose(run)`` picks the mounter once per call:

- ``KernelMounter`` when the kernel has an NFS client (``nfs`` in
  ``/proc/filesystems``, or an nfs module to load): ``mount -t nfs -o
  vers=V,soft,timeo=T,retrans=R,proto=tcp,retry=0[,port=P][,extra] host:/path
  target`` (``smcommon.nfs.mount_options``).
- ``DevMounter`` when the kernel has none and the development mode is on
  (``SM_NFS_DEV_MODE=1``): it talks NFS to the server for real first
  (``nfs-ls`` of the very path a mount would get, so a missing directory or a
  refused client fails as a mount would), then bind-mounts the local
  directory behind that path, found in the map ``SM_NFS_DEV_EXPORTS`` names:
  a JSON object ``{"host:/export": "/local/dir", ...}`` (the server's export
  ``Path`` for each pseudo path; it only makes sense on the server's own
  machine, as in the tests).  The map is refused while the mode is off.
- Otherwise SR.create/attach fail with NFS_CLIENT_MISSING, saying all this.

Each ``mount`` returns what it did, for the SR's state file and
Query.diagnostics: ``mode`` ("kernel" or "dev"), the kernel ``argv`` (run,
or stood in for), and in dev mode what was ``checked`` over NFS and the
``local`` directory bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smcommon import mount, nfs
from smcommon.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ENV_DEV_MODE = "SM_NFS_DEV_MODE"
ENV_DEV_EXPORTS = "SM_NFS_DEV_EXPORTS"
FILESYSTEMS = "/proc/filesystems"
MODULES = "/lib/modules"
MOUNT_TIMEOUT = 20.0  # retry=0: failures take 1-4 s, a first v3 mount ~5 s


def kernel_has_nfs() -> bool:
    try:
        with open(FILESYSTEMS, encoding="ascii", errors="replace") as f:
            if any(line.split()[-1:] in (["nfs"], ["nfs4"]) for line in f):
                return True
    except OSError:
        pass
    return os.path.isdir(os.path.join(MODULES, os.uname().release, "kernel", "fs", "nfs"))


def dev_mode_on() -> bool:
    return os.environ.get(ENV_DEV_MODE, "").strip() == "1"


def choose(run: Any) -> Any:
    if kernel_has_nfs():
        return KernelMounter(run)
    if not dev_mode_on():
        raise BackendError(
            "NFS_CLIENT_MISSING",
            [
                "this kernel has no NFS client (no nfs in /proc/filesystems, no nfs module)",
                (
                    f"for development only: {ENV_DEV_MODE}=1 and {ENV_DEV_EXPORTS}=<map of "
                    "host:/export to the local directory it exports> (docs/design.md)"
                ),
            ],
        )
    return DevMounter(run, load_dev_map())


def describe_mode() -> list[str]:
    """Query.diagnostics: which mount this host uses, and why."""
    if kernel_has_nfs():
        out = ["mount mode: kernel (the kernel has an NFS client)"]
        if os.environ.get(ENV_DEV_EXPORTS):
            out.append(f"  {ENV_DEV_EXPORTS} is set and not used (the kernel mounts)")
        return out
    if not dev_mode_on():
        return [f"mount mode: none (no NFS client in this kernel; {ENV_DEV_MODE} is not 1)"]
    out = [
        (
            f"mount mode: dev (no NFS client in this kernel; {ENV_DEV_MODE}=1): NFS is "
            "spoken to the server (rpcinfo, showmount, nfs-ls), then the exported "
            "directory is bind-mounted"
        )
    ]
    try:
        for (host, export), local in sorted(load_dev_map().items()):
            out.append(f"  {nfs.Server(host).source(export)} -> {local}")
    except BackendError as e:
        out.append(f"  {e}")
    return out


def _dev_error(why: str) -> BackendError:
    return BackendError("NFS_DEV_MODE_INVALID", [f"{ENV_DEV_EXPORTS}: {why}"])


def load_dev_map() -> dict[tuple[str, str], str]:
    """``SM_NFS_DEV_EXPORTS``'s map: (host, export path) -> local directory."""
    if not dev_mode_on():
        raise _dev_error(f"refused: the development mode is off ({ENV_DEV_MODE}=1)")
    name = os.environ.get(ENV_DEV_EXPORTS, "")
    if not name:
        raise _dev_error(f"not set: the development mode needs it ({ENV_DEV_MODE}=1)")
    try:
        doc = json.loads(Path(name).read_bytes())
    except (OSError, ValueError) as e:
        raise _dev_error(f"{name} is not a readable JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise _dev_error(f"{name} must hold an object of \"host:/export\": \"/local/dir\"")
    out = {}
    for key, local in doc.items():
        host, sep, export = str(key).rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not export.startswith("/"):
            raise _dev_error(f"{name}: key {key!r} is not host:/export")
        if not isinstance(local, str) or not os.path.isabs(local) or not os.path.isdir(local):
            raise _dev_error(f"{name}: {key!r} must map to an existing absolute directory")
        out[(host, "/" + "/".join(p for p in export.split("/") if p))] = local
    return out


def _refine_refusal(server: nfs.Server, path: str, err: BackendError, run: Any) -> BackendError:
    """NFSv3 servers refuse a path that is not there as they refuse a client
    that is not allowed: the export list tells which."""
    if not isinstance(err, nfs.MountRefused) or server.v4:
        return err
    try:
        exps = nfs.exports(server, run)
    except BackendError:
        return err
    if nfs.covering(exps, path) is None:
        shown = ", ".join(e.path for e in exps) or "none"
        return nfs.ExportMissing(
            [f"{server.where(path)}: not in the server's exports (exports: {shown})"]
        )
    return err


class KernelMounter:
    name = "kernel"

    def __init__(self, run: Any) -> None:
        self.run = run

    def mount(self, server: nfs.Server, path: str, target: Path, options: list[str]) -> dict[str, Any]:
        opts = nfs.mount_options(server.version, server.port, options)
        source = server.source(path)
        try:
            mount.mount(
                source, str(target), fstype="nfs", options=opts, runner=self.run,
                timeout=MOUNT_TIMEOUT, what=source,
            )  # fmt: skip
        except mount.MountFailed as e:
            err = nfs.mount_failure(server, path, e.details[-1])
            raise _refine_refusal(server, path, err, self.run) from None
        return {"mode": self.name, "argv": mount.mount_argv(source, str(target), "nfs", opts)}


class DevMounter:
    name = "dev"

    def __init__(self, run: Any, exports: dict[tuple[str, str], str]) -> None:
        self.run = run
        self.exports = exports

    def local_dir(self, server: nfs.Server, path: str) -> str:
        best = None
        for (host, export), local in self.exports.items():
            if host != server.host:
                continue
            inside = path == export or path.startswith(export.rstrip("/") + "/")
            if inside and (best is None or len(export) > len(best[0])):
                best = (export, local)
        if best is None:
            raise _dev_error(f"no local directory for {server.source(path)}")
        export, local = best
        root = os.path.realpath(local)
        rel = path[len(export):].lstrip("/")
        real = os.path.realpath(os.path.join(root, rel))
        if real != root and not real.startswith(root + os.sep):
            raise _dev_error(f"{server.source(path)} leads outside {root}")
        return real

    def mount(self, server: nfs.Server, path: str, target: Path, options: list[str]) -> dict[str, Any]:
        try:
            names = nfs.list_dir(server, path, self.run)
        except BackendError as e:
            raise _refine_refusal(server, path, e, self.run) from None
        local = self.local_dir(server, path)
        if not os.path.isdir(local):
            raise _dev_error(f"{local} (for {server.source(path)}) is not a directory here")
        mount.bind(local, str(target), runner=self.run, timeout=MOUNT_TIMEOUT)
        opts = nfs.mount_options(server.version, server.port, options)
        return {
            "mode": self.name,
            "checked": f"nfs-ls {server.url(path)}: {len(names)} entries",
            "local": local,
            "argv": mount.mount_argv(server.source(path), str(target), "nfs", opts),
        }
