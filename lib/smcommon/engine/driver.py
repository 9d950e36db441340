"""The generic SR driver: every SMAPI method mapped onto the engine.

``Driver(paths, sr_type)`` is what ``smcommon.plugin.main`` calls
(``"VDI.create"`` -> ``driver.vdi_create(dbg=..., sr=..., vdi_info=...)``).
What differs between SR types (how storage is prepared, mounted, wiped, and
what Query.query says) is the ``SrType`` object; everything else (records,
trees, datapaths, GC, host registry) is here and in the engine modules.

Extra methods (``extra_methods``): ``SR.gc`` runs a collector pass in the
foreground (once a running collector process finished its own) and answers
its report; ``SR.stat`` answers the SR's space (total, free, used by VDIs,
shared hidden parents and garbage).

``VDI.import_raw {sr, vdi, path}`` writes a raw file the dispatcher
spooled under ``<state_dir>/import`` into an empty VDI (the receiving end of a
remote VDI.copy; ``smcommon.engine.remote``).

VDI.copy copies into an SR attached on *this* host when ``url`` is empty,
``local`` or a ``file://`` URL, or an http(s)/xmlrpc URL naming this host
(localhost, a loopback address, or this host's name) while ``dest`` is
attached here.  Otherwise ``url`` is another host's dispatcher, which must be
a peer in this host's pool.json (``https://HOST:PORT/``, mutual TLS), and the
copy goes there (``remote.copy_to_remote``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from smcommon import timestamps
from smcommon.engine import locks, vdipath
from smcommon.engine.host import Attached, HostRegistry, public_config
from smcommon.engine.meta import Metadata
from smcommon.engine.owned import Ownership
from smcommon.engine.sr import SrEngine
from smcommon.errors import BackendError, InvalidRequest, SrAttached
from smcommon.paths import Paths, safe_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # typing costs each plugin process ~3 ms to import

log = logging.getLogger(__name__)


class SrType(Protocol):
    """What is specific to one SR type (see plugins/ext/ext_driver.py).

    ``secret_keys``: the device_config keys that hold secrets (a CHAP
    password): never written to the host registry, a log line or an error
    (``host.public_config``, ``smcommon.plugin`` masks their values).  A type
    that does not declare it has none of its device_config written down."""

    name: str
    secret_keys: frozenset[str]

    def query(self) -> dict[str, Any]: ...

    def open(
        self, sr: str, device_config: dict[str, str], create: bool
    ) -> tuple[Path, bool]:
        """Prepare the storage; the SR directory and whether it was mounted."""

    def close(self, sr: str, sr_dir: Path, mounted: bool) -> None: ...

    def wipe(self, sr: str, device_config: dict[str, str]) -> None: ...


def extra_methods() -> list[Any]:
    """The methods every engine-based plugin serves beyond the SMAPI."""
    from smcommon import api

    return [
        api.Method(
            "SR.gc",
            [api.Arg("sr", api.KEY, "The Storage Repository to collect")],
            api.STRING,
            "Run the garbage collector of the SR now; returns its report",
            "report",
        ),
        api.Method(
            "SR.stat",
            [api.Arg("sr", api.KEY, "The Storage Repository")],
            api.ANY,
            "The SR's space: total, free, used, and how much of it VDIs, "
            "their shared hidden parents and garbage hold",
            "sr_stat",
        ),
        api.Method(
            "VDI.import_raw",
            [
                api.Arg("sr", api.KEY, "The Storage Repository of the VDI"),
                api.Arg("vdi", api.KEY, "The empty VDI to fill"),
                api.Arg("path", api.STRING, "A raw file under <state_dir>/import"),
            ],
            api.INT64,
            "Write a raw file's non-zero blocks into an empty VDI; returns the bytes written",
            "written",
        ),
    ]


class Driver:
    """SMAPI methods over the engine, for one SR type."""

    def __init__(self, paths: Paths, sr_type: SrType, vhd: Any = None) -> None:
        self.paths = paths
        self.type = sr_type
        self.vhd = vhd
        self.registry = HostRegistry(paths)

    @property
    def extra_methods(self) -> list[Any]:
        return extra_methods()

    def engine(self, sr: str, check_dir: bool = True) -> SrEngine:
        entry = self.registry.require(safe_name("sr", sr))
        sr_dir = Path(entry.sr_dir)
        if check_dir and not sr_dir.is_dir():
            raise BackendError(
                "SR_DIR_MISSING", [f"SR {sr} directory {sr_dir} is gone"]
            )
        key = entry.sr
        return SrEngine(
            self.paths,
            key,
            sr_dir,
            store=self.store(key, sr_dir),
            vhd=self.vhd,
            still_attached=lambda: self.registry.get(key) is not None,
            type_module=self.type_module(),
        )

    def store(self, sr: str, sr_dir: Path) -> Any:
        """The SR type's VolumeStore, if it has its own (None: files in sr_dir)."""
        make = getattr(self.type, "store", None)
        return make(sr, sr_dir, self.vhd) if make is not None else None

    def type_module(self) -> str | None:
        """The file of the SR type's module if the type makes its own store (the
        collector process loads it, ``collector.main``), else None."""
        if getattr(self.type, "store", None) is None:
            return None
        module = sys.modules.get(type(self.type).__module__)
        return getattr(module, "__file__", None)

    # --- Query ---------------------------------------------------------------

    def query_query(self, dbg: str) -> dict[str, Any]:
        return self.type.query()

    def query_diagnostics(self, dbg: str) -> str:
        from smcommon.engine.diagnostics import report

        return report(self)

    # --- SR ------------------------------------------------------------------

    def sr_ls(self, dbg: str) -> list[str]:
        return self.registry.srs()

    def sr_create(
        self, dbg: str, sr: str, device_config: dict[str, str], physical_size: int
    ) -> None:
        sr = safe_name("sr", sr)
        if physical_size < 0:
            raise InvalidRequest(f"physical_size must not be negative: {physical_size}")
        if self.registry.get(sr) is not None:
            raise SrAttached(sr)
        with locks.host_sr_lock(self.paths, sr):
            sr_dir, mounted = self.type.open(sr, device_config, True)
            try:
                meta = Metadata(sr_dir)
                existing = meta.read_sr()
                if existing is not None:
                    raise BackendError(
                        "SR_EXISTS",
                        [
                            f"{sr_dir} already holds SR {existing.get('sr')}: destroy it first"
                        ],
                    )
                foreign = _foreign_images(sr_dir)
                if foreign:
                    names = ", ".join(foreign[:5])
                    # SR.destroy removes every image of the SR's directory:
                    # refuse to adopt images that belong to no SR.
                    raise BackendError(
                        "SR_DIR_HOLDS_IMAGES",
                        [
                            f"{sr_dir} holds VHD files of no SR ({names}): use an empty directory"
                        ],
                    )
                # ownership records first: an SR with an identity always has them
                Ownership(meta.sm_dir).init()
                meta.write_sr(
                    {
                        "sr": sr,
                        "type": self.type.name,
                        "created": timestamps.now(),
                        "physical_size": int(physical_size),
                        "format": 1,
                    }
                )
            finally:
                if mounted:
                    self.type.close(sr, sr_dir, mounted)
        log.info("created SR %s (%s) in %s", sr, self.type.name, sr_dir)

    @property
    def secret_keys(self) -> frozenset[str] | None:
        """The SR type's declared secret keys (None: it declares nothing)."""
        return getattr(self.type, "secret_keys", None)

    def public_config(self, device_config: dict[str, str]) -> dict[str, str]:
        """device_config as the host registry keeps it (see ``SrType``)."""
        secret = self.secret_keys
        if secret is None:
            log.warning(
                "SR type %s declares no secret_keys: its device_config is not kept",
                self.type.name,
            )
        known = self.type.query().get("configuration") or {}
        return public_config(device_config, known, secret)

    def sr_attach(self, dbg: str, sr: str, device_config: dict[str, str]) -> None:
        sr = safe_name("sr", sr)
        with locks.host_sr_lock(self.paths, sr):
            entry = self.registry.get(sr)
            if entry is not None and Path(entry.sr_dir).is_dir():
                self._check_identity(sr, Path(entry.sr_dir))
                return
            sr_dir, mounted = self.type.open(sr, device_config, False)
            try:
                self._check_identity(sr, sr_dir)
            except BaseException:
                if mounted:
                    with contextlib.suppress(Exception):
                        self.type.close(sr, sr_dir, mounted)
                raise
            self.registry.put(
                Attached(
                    sr=sr,
                    type=self.type.name,
                    sr_dir=str(sr_dir),
                    device_config=self.public_config(device_config),
                    mounted=mounted,
                    attached=timestamps.now(),
                )
            )
            eng = SrEngine(self.paths, sr, sr_dir, store=self.store(sr, sr_dir), vhd=self.vhd,
                           type_module=self.type_module())
            with eng.tree_lock():
                pass  # finishes an interrupted switch; ownership of an old SR
        if eng.meta.gc_file.exists():
            eng.request_gc()  # a merge a killed collector left: resume it
        log.info("attached SR %s at %s", sr, sr_dir)

    def _check_identity(self, sr: str, sr_dir: Path) -> None:
        doc = Metadata(sr_dir).read_sr()
        if doc is None:
            raise BackendError(
                "SR_NOT_FOUND", [f"no SR in {sr_dir} (never created, or destroyed)"]
            )
        if doc.get("sr") != sr:
            raise BackendError(
                "SR_UUID_MISMATCH", [f"{sr_dir} holds SR {doc.get('sr')}, not {sr}"]
            )

    def sr_detach(self, dbg: str, sr: str) -> None:
        from smcommon.engine import collector

        eng = self.engine(sr, check_dir=False)
        # before any lock: a collector may be waiting for the tree lock to switch
        collector.stop(eng)
        with locks.host_sr_lock(self.paths, eng.sr):
            entry = self.registry.require(eng.sr)
            with contextlib.ExitStack() as shared:
                if eng.meta.sm_dir.is_dir():  # else nothing shared is left to lock
                    shared.enter_context(eng.tree_lock(resume_gc=False))
                    collector.stop(eng)  # one a call started meanwhile
                released = vdipath.release_all(eng)
                if released:
                    log.info("SR.detach of %s released datapaths %s", sr, released)
            # the tree lock's file is in the SR: closed before the unmount
            self.type.close(eng.sr, eng.sr_dir, entry.mounted)
            self.registry.remove(eng.sr)
            _rmtree(eng.dps.state_dir, ignore_errors=True)

    def sr_destroy(self, dbg: str, sr: str) -> None:
        from smcommon.engine import collector

        eng = self.engine(sr)
        entry = self.registry.require(eng.sr)
        collector.stop(eng)  # before the tree lock: it may wait for it to switch
        with locks.host_sr_lock(self.paths, eng.sr):
            with eng.tree_lock(resume_gc=False):
                collector.stop(eng)  # one a call started meanwhile
                vdipath.release_all(eng)
                # only what the SR made goes: files copied into its directory stay
                owned = eng.owned.owned() | eng.needed_volumes()
                # The identity goes first: from then on the SR can be neither
                # attached nor probed, even if the rest is interrupted.
                with contextlib.suppress(FileNotFoundError):
                    eng.meta.sr_file.unlink()
                for volume in eng.store.volumes():
                    if volume in owned:
                        eng.store.remove(volume)
                eng.store.cleanup_partial(owned)
                _rmtree(eng.meta.sm_dir, ignore_errors=True)
                _rmtree(eng.dps.state_dir, ignore_errors=True)
            # again once the lock file is closed (NFS keeps an open file that
            # was removed as a .nfsXXXX name until it is closed)
            _rmtree(eng.meta.sm_dir, ignore_errors=True)
            destroy = getattr(self.type, "destroy", None)
            if destroy is not None:  # the type releases and wipes its storage itself
                destroy(eng.sr, eng.sr_dir, entry)
            else:
                self.type.close(eng.sr, eng.sr_dir, entry.mounted)
                self.type.wipe(eng.sr, entry.device_config)
            self.registry.remove(eng.sr)
        log.info("destroyed SR %s", sr)

    def sr_reset(self, dbg: str, sr: str) -> None:
        sr = safe_name("sr", sr)
        with locks.host_sr_lock(self.paths, sr):
            entry = self.registry.get(sr)
            _rmtree(self.paths.run_dir / "dp" / sr, ignore_errors=True)
            if entry is not None and entry.mounted:
                with contextlib.suppress(Exception):
                    self.type.close(sr, Path(entry.sr_dir), True)
            # a mount a killed SR.create/attach left (close ignores what is
            # not mounted)
            with contextlib.suppress(Exception):
                self.type.close(sr, self.paths.sr_mount(sr), True)
            if entry is not None:
                self.registry.remove(sr)
        log.info("reset SR %s: this host's state of it is forgotten", sr)

    def sr_scan(self, dbg: str, sr: str) -> list[dict[str, Any]]:
        return self.engine(sr).scan()

    def sr_stat(self, dbg: str, sr: str) -> dict[str, Any]:
        from smcommon.engine.diagnostics import space

        return space(self.engine(sr))

    def sr_gc(self, dbg: str, sr: str) -> str:
        from smcommon.engine import collector

        eng = self.engine(sr)
        rep = collector.run_foreground(eng)
        return (
            rep.summary()
            + "".join(f"\nskipped: {s}" for s in rep.skipped)
            + "".join(f"\nerror: {s}" for s in rep.errors)
        )

    # --- VDI -----------------------------------------------------------------

    def vdi_create(self, dbg: str, sr: str, vdi_info: dict[str, Any]) -> dict[str, Any]:
        return self.engine(sr).create(vdi_info)

    def vdi_snapshot(
        self, dbg: str, sr: str, vdi_info: dict[str, Any]
    ) -> dict[str, Any]:
        return self.engine(sr).snapshot(vdi_info)

    def vdi_clone(self, dbg: str, sr: str, vdi_info: dict[str, Any]) -> dict[str, Any]:
        return self.engine(sr).clone(vdi_info)

    def vdi_destroy(self, dbg: str, sr: str, vdi: str) -> None:
        self.engine(sr).destroy(vdi)

    def vdi_stat(self, dbg: str, sr: str, vdi: str) -> dict[str, Any]:
        return self.engine(sr).stat(vdi)

    def vdi_set_persistent(self, dbg: str, sr: str, vdi: str, persistent: bool) -> None:
        self.engine(sr).set_persistent(vdi, persistent)

    def vdi_epoch_begin(self, dbg: str, sr: str, vdi: str) -> None:
        self.engine(sr).epoch_begin(vdi)

    def vdi_epoch_end(self, dbg: str, sr: str, vdi: str) -> None:
        self.engine(sr).epoch_end(vdi)

    def vdi_attach(
        self, dbg: str, dp: str, sr: str, vdi: str, read_write: bool
    ) -> dict[str, Any]:
        return vdipath.attach(self.engine(sr), dp, vdi, read_write)

    def vdi_activate(self, dbg: str, dp: str, sr: str, vdi: str) -> None:
        vdipath.activate(self.engine(sr), dp, vdi)

    def vdi_deactivate(self, dbg: str, dp: str, sr: str, vdi: str) -> None:
        vdipath.deactivate(self.engine(sr), dp, vdi)

    def vdi_detach(self, dbg: str, dp: str, sr: str, vdi: str) -> None:
        vdipath.detach(self.engine(sr), dp, vdi)

    def vdi_get_url(self, dbg: str, sr: str, vdi: str) -> str:
        return self.engine(sr).get_url(vdi)

    def vdi_get_by_name(self, dbg: str, sr: str, name: str) -> dict[str, Any]:
        return self.engine(sr).get_by_name(name)

    def vdi_set_content_id(self, dbg: str, sr: str, vdi: str, content_id: str) -> None:
        self.engine(sr).set_content_id(vdi, content_id)

    def vdi_compose(self, dbg: str, sr: str, vdi1: str, vdi2: str) -> None:
        self.engine(sr).compose(vdi1, vdi2)

    def vdi_similar_content(self, dbg: str, sr: str, vdi: str) -> list[dict[str, Any]]:
        return self.engine(sr).similar_content(vdi)

    def vdi_import_raw(self, dbg: str, sr: str, vdi: str, path: str) -> int:
        from smcommon.engine import remote

        return remote.import_raw(self.engine(sr), vdi, path)

    def vdi_copy(self, dbg: str, sr: str, vdi: str, url: str, dest: str) -> str:
        where = url_kind(url)
        dest = safe_name("dest", dest)
        entry = self.registry.get(dest)
        other_type = entry is not None and entry.type != self.type.name
        if where == "local" and other_type:
            assert entry is not None
            raise BackendError(
                "SR_TYPE_DIFFERS",
                [
                    (f"SR {dest} is a {entry.type} SR, not {self.type.name}: copy into it "
                    "through its dispatcher (url=http://HOST:PORT/)")
                ],
            )
        if where == "remote" or (where == "here" and (entry is None or other_type)):
            from smcommon.engine import remote

            new_key = remote.copy_to_remote(self.engine(sr), vdi, url, dest, dbg)
            log.info("copied VDI %s of SR %s to VDI %s of SR %s at %s",
                     vdi, sr, new_key, dest, url)  # fmt: skip
            return new_key
        src = self.engine(sr)
        dst = self.engine(dest)
        # Lock order: SR locks first (by SR key when there are two, so crossing
        # copies cannot deadlock), then the VDI lock.  The source's SR lock also
        # keeps GC from re-linking the chain being read.
        with contextlib.ExitStack() as held:
            for eng in sorted({src.sr: src, dst.sr: dst}.values(), key=lambda e: e.sr):
                held.enter_context(eng.tree_lock())
            rec = src.get(vdi)
            held.enter_context(src.vdi_lock(rec.vdi))
            leaf = held.enter_context(src.store.held(rec.volume))
            new = dst.import_image(leaf, rec)
        log.info(
            "copied VDI %s of SR %s to VDI %s of SR %s", rec.vdi, sr, new["vdi"], dest
        )
        return str(new["vdi"])


def _foreign_images(sr_dir: Path) -> list[str]:
    from smcommon.engine.store import VHD_SUFFIX

    with os.scandir(sr_dir) as entries:
        return sorted(e.name for e in entries if e.name.endswith(VHD_SUFFIX))


def url_kind(url: str) -> str:
    """``local`` (empty, ``local``, file://), ``here`` (a URL naming this host:
    local when ``dest`` is attached here, else a dispatcher on this machine),
    or ``remote`` (another host's dispatcher)."""
    if not isinstance(url, str):
        raise InvalidRequest("url must be a string")
    if url.strip() in ("", "local"):
        return "local"
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return "local"
    host = (parsed.hostname or "").lower()
    if parsed.scheme in ("http", "https", "xmlrpc") and host in _local_names():
        return "here"
    return "remote"


def _rmtree(path: Path, ignore_errors: bool = True) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)


def _local_names() -> set[str]:
    import socket

    names = {"", "localhost", "127.0.0.1", "::1", "localhost.localdomain"}
    with contextlib.suppress(OSError):
        names.add(socket.gethostname().lower())
        names.add(socket.getfqdn().lower())
    return names
