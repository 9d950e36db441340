"""What is specific to the nfs SR type: the share, its mount, and Query.query.

An nfs SR keeps its VHD files (and its ``.sm`` metadata) in the directory
``<serverpath>/<sr>`` of an NFS export, mounted at ``Paths.sr_mount(sr)``; the
engine and its FileStore are the ones ext uses.  Several hosts attach the same
SR: what they must agree on is locked on the share (``smcommon.engine.locks``),
what only a host knows (its mount, datapaths) stays on the host.

device_config: see ``CONFIGURATION`` (Query.query lists it); none of its keys
is secret (``SECRET_KEYS``).

SR.create mounts ``<serverpath>`` for a moment to make ``<sr>`` in it;
SR.attach mounts ``<serverpath>/<sr>``; SR.detach unmounts it (a mount in use
is reported, never lazily detached); SR.destroy removes the SR's files, then
``<serverpath>/<sr>`` itself.  Before any mount, and before every call on an
attached SR, the server is probed (``smcommon.nfs.probe``: an RPC NULL call
with a short timeout), so a dead host, a closed port or a stopped NFS service
is reported in seconds, naming the server and port; a missing export or
directory and a refused mount name the path.

The mount goes through one seam, ``Mounter`` (``nfs_mounters.py``): the kernel
client (``mount -t nfs``) when the kernel has one, or the development mode
(``SM_NFS_MOUNT=dev``): it talks NFS to the server for real (``nfs-ls`` of the
path), then bind-mounts the local directory the server exports
(``SM_NFS_DEV_EXPORTS``); see docs/design.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from smcommon.engine.front import SrPlugin

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

    from smcommon.nfs import Server
    from smcommon.paths import Paths

DRIVER = "nfs"
# What a call may import, imported once by the dispatcher's warm parent of this
# plugin (dispatcher/zygote.py); a direct run imports only what its method needs.
WARM_IMPORTS = [
    "nfs_mounters",
    "smcommon.nfs",
    "smcommon.mount",
    "smcommon.engine.front",
]
VERSION = "0.1.0"
MAX_PATH = 1024

CONFIGURATION = {
    "server": "the NFS server: a host name or an IP address (required)",
    "serverpath": "the exported directory (or a directory below it) that holds the SR "
    "directories <serverpath>/<sr> (required; absolute)",
    "nfsversion": "the NFS version: 3 (default), 4, 4.0, 4.1 or 4.2",
    "port": "the server's NFS port (default: 2049 for NFSv4, rpcbind's answer for NFSv3)",
    "options": "extra mount options, comma-separated, from an allow-list (rsize, wsize, "
    "timeo 5-600, retrans 1-5, actimeo, noatime, nconnect, sec, ...); hard, nolock, "
    "retry, vers and port are refused",
}
SECRET_KEYS: frozenset[str] = frozenset()  # none of nfs's keys holds a secret
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
    "THIN_PROVISIONING",
]
# calls that need no server, or probe it themselves (SR.create mounts; SR.attach
# of an SR not attached here mounts, and probes then; SR.reset forgets host state)
_NO_PROBE = frozenset({"query_query", "query_diagnostics", "sr_ls", "sr_create", "sr_reset"})
_HOST = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PATH = re.compile(r"/[A-Za-z0-9._~+@=/-]*")


def query_result() -> dict[str, object]:
    return {
        "driver": DRIVER,
        "name": "nfs",
        "description": "VHD images in a directory of an NFS export, shared by several hosts",
        "vendor": "smcommon",
        "copyright": "LGPL-2.1-only",
        "version": VERSION,
        "required_api_version": "2.0",
        "features": list(FEATURES),
        "configuration": dict(CONFIGURATION),
    }


def _invalid(key: str, why: str) -> Exception:
    from smcommon.errors import BackendError

    return BackendError("DEVICE_CONFIG_INVALID", [f"{key}: {why}"])


class NfsConfig:
    """device_config, checked: every problem names its key (values are not
    echoed)."""

    __slots__ = ("options", "server", "serverpath")

    def __init__(self, server: Server, serverpath: str, options: list[str]) -> None:
        self.server = server
        self.serverpath = serverpath
        self.options = options

    @classmethod
    def parse(cls, dc: dict[str, str]) -> NfsConfig:
        import ipaddress

        from smcommon import nfs

        for key in ("server", "serverpath"):
            if not dc.get(key):
                raise _invalid(key, f"required ({key}: {CONFIGURATION[key]})")
            if not isinstance(dc[key], str):
                raise _invalid(key, "must be a string")
        host = dc["server"].strip()
        try:
            host = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            if not _HOST.fullmatch(host):
                raise _invalid("server", "must be a host name or an IP address") from None
        path = dc["serverpath"]
        if len(path) > MAX_PATH or not _PATH.fullmatch(path):
            raise _invalid(
                "serverpath",
                "must be an absolute path of letters, digits and . _ ~ + @ = - /",
            )
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise _invalid("serverpath", "must not hold . or .. components")
        path = "/" + "/".join(parts)
        version = str(dc.get("nfsversion") or nfs.DEFAULT_VERSION).strip()
        if version not in nfs.VERSIONS:
            raise _invalid("nfsversion", f"must be one of {', '.join(nfs.VERSIONS)}")
        port_text = str(dc.get("port") or "").strip()
        port = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise _invalid("port", "must be a TCP port number from 1 to 65535")
            port = int(port_text)
        options = nfs.parse_options(dc.get("options") or "")
        return cls(nfs.Server(host, version, port), path, options)

    def sr_path(self, sr: str) -> str:
        return self.serverpath.rstrip("/") + "/" + sr


class NfsType:
    """The engine's SrType for nfs: mount, unmount and remove the SR directory."""

    name = DRIVER
    secret_keys = SECRET_KEYS

    def __init__(self, paths: Paths, runner: Any = None, mounter: Any = None) -> None:
        self.paths = paths
        self._runner = runner
        self._mounter = mounter

    def run(self, argv: list[str], **kw: Any) -> Any:
        if self._runner is None:
            from smcommon.runner import run

            self._runner = run
        return self._runner(argv, **kw)

    def mounter(self) -> Any:
        if self._mounter is None:
            from nfs_mounters import choose

            self._mounter = choose(self.run)
        return self._mounter

    def query(self) -> dict[str, object]:
        return query_result()

    # --- per-host state: what this host mounted, for detach and diagnostics

    def state_file(self, sr: str) -> Path:
        from smcommon.paths import safe_name

        return self.paths.run_dir / "nfs" / (safe_name("sr", sr) + ".json")

    def state(self, sr: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.state_file(sr).read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _save_state(self, sr: str, doc: dict[str, Any]) -> None:
        from smcommon.fileio import atomic_write_json

        path = self.state_file(sr)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, doc)

    def _drop_state(self, sr: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_file(sr))

    # --- the probe -------------------------------------------------------------

    def probe(self, server: Server, mount_service: bool = True) -> Any:
        from smcommon import nfs

        return nfs.probe(server, self.run, mount_service=mount_service)

    def check_online(self, sr: str) -> None:
        """Before a call on an attached SR: its server answers (bounded)."""
        doc = self.state(sr)
        if doc is None:
            return  # not mounted by this type on this host: the engine answers
        from smcommon import nfs

        server = nfs.Server(doc["server"], doc["version"], doc.get("port"))
        self.probe(server, mount_service=False)

    # --- SrType ----------------------------------------------------------------

    def open(self, sr: str, device_config: dict[str, str], create: bool) -> tuple[Path, bool]:
        from smcommon import mount

        cfg = NfsConfig.parse(device_config)
        mounter = self.mounter()
        mnt = self.paths.sr_mount(sr)
        if mount.mounted_at(str(mnt)) is not None:
            doc = self.state(sr)
            if not create and doc is not None and doc.get("source") == cfg.server.source(
                cfg.sr_path(sr)
            ):
                return mnt, True
            # a mount a killed call left (or of another source): undo it first
            self.close(sr, mnt, True)
        self.probe(cfg.server)
        if create:
            self._make_sr_dir(cfg, sr, mounter)
        mnt.mkdir(parents=True, exist_ok=True)
        try:
            done = mounter.mount(cfg.server, cfg.sr_path(sr), mnt, cfg.options)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
            self._explain_missing_sr_dir(cfg, sr, mounter, e)
            raise
        self._save_state(
            sr,
            {
                "sr": sr,
                "server": cfg.server.host,
                "version": cfg.server.version,
                "port": cfg.server.port,
                "serverpath": cfg.serverpath,
                "source": cfg.server.source(cfg.sr_path(sr)),
                "target": str(mnt),
                **done,
            },
        )
        return mnt, True

    @contextlib.contextmanager
    def _parent_mounted(self, cfg: NfsConfig, sr: str, mounter: Any) -> Iterator[Path]:
        """``<serverpath>`` mounted for a moment (SR.create and SR.destroy)."""
        from smcommon import mount

        tmp = self.paths.run_dir / "nfs" / "parent" / sr
        if mount.mounted_at(str(tmp)) is not None:  # left by a killed call
            mount.umount(str(tmp), runner=self.run)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            mounter.mount(cfg.server, cfg.serverpath, tmp, cfg.options)
            try:
                yield tmp
            finally:
                mount.umount(str(tmp), runner=self.run)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(tmp)

    def _make_sr_dir(self, cfg: NfsConfig, sr: str, mounter: Any) -> None:
        from smcommon.engine.meta import Metadata
        from smcommon.errors import BackendError
        from smcommon.fileio import fsync_dir

        with self._parent_mounted(cfg, sr, mounter) as parent:
            held = Metadata(parent).read_sr()
            if held is not None:
                raise BackendError(
                    "SR_EXISTS",
                    [
                        (
                            f"{cfg.server.where(cfg.serverpath)}: serverpath is itself "
                            f"the directory of SR {held.get('sr')}: name its parent"
                        )
                    ],
                )
            d = parent / sr
            if not d.is_dir():
                d.mkdir(mode=0o755)
                fsync_dir(parent)

    def _explain_missing_sr_dir(
        self, cfg: NfsConfig, sr: str, mounter: Any, failure: Exception
    ) -> None:
        """A refused or missing ``<serverpath>/<sr>``: is the SR directory the
        missing part?  Raises SR_DIR_MISSING if so; returns otherwise."""
        from smcommon import nfs
        from smcommon.errors import BackendError

        if not isinstance(failure, (nfs.ExportMissing, nfs.MountRefused)):
            return
        try:
            with self._parent_mounted(cfg, sr, mounter) as parent:
                present = (parent / sr).is_dir()
        except BackendError:
            return  # the parent fails too: the first error says why
        if not present:
            raise BackendError(
                "SR_DIR_MISSING",
                [
                    (
                        f"{cfg.server.where(cfg.sr_path(sr))}: the SR directory does not "
                        "exist on the server (never created, or destroyed)"
                    )
                ],
            ) from None

    def close(self, sr: str, sr_dir: Path, mounted: bool) -> None:
        from smcommon import mount

        if mount.mounted_at(str(sr_dir)) is not None:
            mount.umount(str(sr_dir), runner=self.run)  # MountBusy if in use
        with contextlib.suppress(OSError):
            os.rmdir(sr_dir)
        self._drop_state(sr)

    def wipe(self, sr: str, device_config: dict[str, str]) -> None:
        """Remove the (now empty) ``<serverpath>/<sr>`` from the share."""
        import logging

        cfg = NfsConfig.parse(device_config)
        with self._parent_mounted(cfg, sr, self.mounter()) as parent:
            try:
                os.rmdir(parent / sr)
            except FileNotFoundError:
                pass
            except OSError as e:
                logging.getLogger(__name__).warning(
                    "SR.destroy of %s: %s kept (%s)", sr, cfg.sr_path(sr), e.strerror
                )

    def diagnostics(self, srs: list[str]) -> list[str]:
        from nfs_mounters import describe_mode

        out = describe_mode()
        for sr in srs:
            doc = self.state(sr)
            if doc is None:
                continue
            out.append(f"SR {sr}: {doc.get('source')} mounted at {doc.get('target')} "
                       f"by the {doc.get('mode')} mount")  # fmt: skip
            for key in ("checked", "local", "argv"):
                if doc.get(key):
                    shown = " ".join(doc[key]) if isinstance(doc[key], list) else doc[key]
                    out.append(f"  {key}: {shown}")
            try:
                self.check_online(sr)
                out.append("  server: answering")
            except Exception as e:  # noqa: BLE001 - reported, not raised
                out.append(f"  server: NOT answering: {e}")
        return out


class NfsPlugin(SrPlugin):
    """The engine's SrPlugin, every call on an attached SR after a probe of its server."""

    sr_type: NfsType

    def query_diagnostics(self, dbg: str) -> str:
        text = self.driver().query_diagnostics(dbg)
        srs = self.driver().sr_ls(dbg)
        return text + "\n".join(["", "NFS:", *self.sr_type.diagnostics(srs)]) + "\n"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        target = getattr(self.driver(), name)
        if name in _NO_PROBE or not callable(target):
            return target

        def call(**kwargs: Any) -> Any:
            for key in ("sr", "dest"):
                value = kwargs.get(key)
                if isinstance(value, str):
                    from smcommon.paths import safe_name

                    self.sr_type.check_online(safe_name(key, value))
            return target(**kwargs)

        return call


def factory(paths: Paths) -> NfsPlugin:
    return NfsPlugin(paths, NfsType(paths))


driver_factory = factory  # the name bench/plugin_bench.py looks for
