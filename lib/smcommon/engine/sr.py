"""The SR/VDI operations of one attached SR: its VDI tree and its metadata.

``SrEngine`` owns everything that changes an SR's tree of VHD volumes and its
VDI records: VDI.create/destroy/stat/scan, snapshot and clone, persistence and
epochs, compose, similar_content, get_url, and the import side of VDI.copy.
Datapath changes (attach/activate/...) are in ``smcommon.engine.vdipath``.

Trees.  A VDI's record names its *leaf* volume, named after the VDI when it
is created, and a VDI keeps that leaf name for life: attach_info.params stays
valid across snapshots, epochs and collections.  Snapshot and clone freeze
the leaf's content as a new hidden read-only base B (``store.push_down``: a
second name for the image, then an empty child of it renamed over the leaf),
so the VDI goes on as an empty child of B; the snapshot (or clone) is another
new empty child of B.  Nothing is copied: the cost does not depend on the
disk's size or data.

Crash safety, by the order of the steps (all under the SR lock, with the
VDI lock too so no datapath change interleaves):

1. push_down: before its final rename the leaf is untouched (B is an extra
   name nobody references: the collector drops the name); after it the
   leaf is an empty child of B, which holds all the data;
2. create the snapshot's leaf S, a child of B (a crash leaves S
   unreferenced: the collector deletes it);
3. write the new VDI's record;
4. hide B (a crash before leaves an unreferenced, unhidden interior volume:
   the collector hides it).

So a kill -9 at any point leaves every VDI on a readable leaf holding all
its acknowledged data; ``smcommon.engine.gc`` finishes or undoes the rest.

Non-persistent VDIs.  set_persistent(false) freezes the current content as
the hidden ``epoch_base`` (push_down: the leaf becomes its empty child).
epoch_begin replaces the leaf by a fresh empty child of the base (the writes
of the last epoch are dropped); set_persistent(true) keeps the current content and
forgets the base.  Collectors never coalesce into an epoch base.

Compose(vdi1, vdi2): vdi1's current content is frozen as a hidden volume B
(push_down: vdi1 continues on an empty child of B), then vdi2's leaf is re-parented
onto B (``store.rebase``: a leaf without a parent has its data copied into a
new child of B instead).  vdi2 then reads its own leaf's sectors (its updates) over vdi1's
content; vdi1 is unchanged.  vdi2's old ancestors lose a child and are
collected if nobody needs them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from smcommon import ids, timestamps
from smcommon.engine import locks
from smcommon.engine.meta import Metadata, VdiRecord
from smcommon.engine.owned import Ownership
from smcommon.engine.store import FileStore, VolumeStore
from smcommon.errors import (
    BackendError,
    Error,
    InvalidRequest,
    SmapiError,
    SrNotAttached,
    VdiDoesNotExist,
)
from smcommon.paths import Paths, safe_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

VDI_FIELDS_STR = ("name_label", "name_description", "ty", "metadata_of_pool")
MAX_TEXT = 4096


def io_code(e: OSError) -> str:
    """The Backend_error code of an OS error met on an SR's storage."""
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "SR_FULL"
    if e.errno == errno.EROFS:
        return "SR_READ_ONLY"
    return "SR_IO_ERROR"


def _text(info: dict[str, Any], key: str, default: str = "") -> str:
    value = info.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"vdi_info.{key} must be a string")
    if len(value) > MAX_TEXT or "\x00" in value:
        raise InvalidRequest(
            f"vdi_info.{key} is longer than {MAX_TEXT} characters or holds NUL"
        )
    return value


def _sm_config(info: dict[str, Any]) -> dict[str, str]:
    cfg = info.get("sm_config") or {}
    if not isinstance(cfg, dict):
        raise InvalidRequest("vdi_info.sm_config must be a map of strings")
    out = {}
    for k, v in cfg.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, bool)):
            raise InvalidRequest("vdi_info.sm_config must be a map of strings")
        out[k] = str(v)
    return out


class SrEngine:
    """The operations on one attached SR whose directory is ``sr_dir``."""

    def __init__(
        self,
        paths: Paths,
        sr: str,
        sr_dir: Path,
        store: VolumeStore | None = None,
        vhd: Any = None,
        still_attached: Callable[[], bool] | None = None,
        collect: Callable[[SrEngine], None] | None = None,
        type_module: str | None = None,
    ) -> None:
        from smcommon.engine.datapath import Datapaths

        self.paths = paths
        self.sr = safe_name("sr", sr)
        self.sr_dir = Path(sr_dir)
        self.meta = Metadata(self.sr_dir)
        self.owned = Ownership(self.meta.sm_dir)
        self.store: VolumeStore = (
            store if store is not None else FileStore(self.sr_dir, vhd)
        )
        self.dps = Datapaths(paths.run_dir / "dp" / self.sr)
        self.still_attached = still_attached
        # what destroy, compose and set_persistent call once they made
        # garbage: by default, start the SR's collector process
        self.collect = collect
        # the file of the SR type's module when the type makes its own store:
        # the collector process loads it to make the same store
        self.type_module = type_module

    def request_gc(self) -> None:
        """Ask for a collection (after the SR lock is released)."""
        if self.collect is not None:
            self.collect(self)
            return
        from smcommon.engine import collector

        collector.request(self)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Name the SR and the step in an I/O failure (a full filesystem, EIO)."""
        try:
            yield
        except (SmapiError, InvalidRequest):
            raise
        except Error as e:
            errno = getattr(e, "errno", None)
            code = io_code(OSError(errno, "")) if errno else e.code
            raise BackendError(code, [f"SR {self.sr}: {what}: {e}"]) from None
        except OSError as e:
            raise BackendError(
                io_code(e), [f"SR {self.sr}: {what}: {e.strerror or e}"]
            ) from None

    def check_attached(self) -> None:
        """Under a lock: the SR may have been detached while we waited."""
        if self.still_attached is not None and not self.still_attached():
            raise SrNotAttached(self.sr)

    # --- locks ---------------------------------------------------------------

    @contextlib.contextmanager
    def tree_lock(
        self, resume_gc: bool = True, timeout: float | None = None
    ) -> Iterator[None]:
        """The SR's tree lock (on the SR's storage, shared by every host that
        attached it).  First, a collector's re-link step left half done by a
        killed process is finished (it is short: the copy before it is the
        collector's), and an SR made by an earlier version gets its
        ownership records."""
        with locks.tree_lock(self.store.shared_lock_dir(), timeout):
            self.check_attached()
            refresh = getattr(self.store, "refresh", None)
            if refresh is not None:  # a store caching what others change (LVStore's lvs)
                refresh()
            recover = getattr(self.store, "recover", None)
            if resume_gc and recover is not None:  # a store's own half-done steps (LVStore)
                recover()
            if resume_gc and self.meta.gc_file.exists():
                from smcommon.engine.merge import finish_switch

                with self.step("finishing an interrupted collector step"):
                    finish_switch(self)
            if not self.owned.ready():
                with self.step("recording the volumes of the SR as its own"):
                    self.owned.migrate(self.needed_volumes())
            yield

    def needed_volumes(self) -> set[str]:
        """Volumes the VDI records need: leaves, epoch bases and their chains."""
        return self.needed_from(self.store.tree(), self.meta.records())

    @staticmethod
    def needed_from(tree: dict[str, Any], recs: list[VdiRecord]) -> set[str]:
        out: set[str] = set()
        for r in recs:
            for v in (r.volume, r.epoch_base):
                seen = 0
                while v is not None and v not in out and seen < 10000:
                    out.add(v)
                    node = tree.get(v)
                    v = node.parent if node else None
                    seen += 1
        return out

    def new_volumes(self, *names: str) -> None:
        """Record volumes as the SR's own before they are made."""
        with self.step("recording new volumes as the SR's own"):
            self.owned.record(*names)

    def vdi_lock(self, vdi: str, timeout: float | None = None) -> Any:
        return locks.vdi_lock(self.store.shared_lock_dir(), safe_name("vdi", vdi), timeout)

    # --- reading -------------------------------------------------------------

    def vdi_info(self, rec: VdiRecord) -> dict[str, Any]:
        return rec.to_vdi_info(self.store.physical_utilisation(rec.volume))

    def get(self, vdi: str) -> VdiRecord:
        return self.meta.get(safe_name("vdi", vdi))

    def stat(self, vdi: str) -> dict[str, Any]:
        return self.vdi_info(self.get(vdi))

    def scan(self) -> list[dict[str, Any]]:
        """Every VDI's vdi_info, oldest first; a valid ``<uuid>.vhd`` someone
        copied into the SR is adopted first (``smcommon.engine.foreign``)."""
        from smcommon.engine import foreign

        if foreign.has_candidates(self):
            with self.tree_lock():
                foreign.adopt(self)
        recs = sorted(self.meta.records(), key=lambda r: (r.created, r.vdi))
        return [self.vdi_info(r) for r in recs]

    def get_by_name(self, name: str) -> dict[str, Any]:
        """The VDI whose name_label (or key) is ``name``; the oldest if several."""
        if not isinstance(name, str) or not name:
            raise InvalidRequest("name must be a non-empty string")
        matches = [
            r for r in self.meta.records() if r.name_label == name or r.vdi == name
        ]
        if not matches:
            raise VdiDoesNotExist(name)
        matches.sort(key=lambda r: (r.vdi != name, r.created, r.vdi))
        return self.vdi_info(matches[0])

    def get_url(self, vdi: str) -> str:
        """file:// URL of the leaf image: a VHD whose parents resolve from it."""
        rec = self.get(vdi)
        return Path(self.store.path(rec.volume)).resolve().as_uri()

    def in_use(self, vdi: str) -> bool:
        return bool(self.dps.states(vdi))

    def _require_unused(self, vdi: str, what: str) -> None:
        states = self.dps.states(vdi)
        if states:
            shown = ", ".join(f"{dp}={s.value}" for dp, s in sorted(states.items()))
            raise BackendError(
                "VDI_IN_USE", [f"cannot {what} VDI {vdi}: datapaths {shown}"]
            )

    # --- create / destroy ----------------------------------------------------

    def create(self, vdi_info: dict[str, Any]) -> dict[str, Any]:
        size = vdi_info.get("virtual_size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidRequest(
                "vdi_info.virtual_size must be a positive number of bytes"
            )
        persistent = vdi_info.get("persistent", True)
        rec = VdiRecord(
            vdi=ids.new(),
            volume="",
            name_label=_text(vdi_info, "name_label"),
            name_description=_text(vdi_info, "name_description"),
            ty=_text(vdi_info, "ty", "user") or "user",
            content_id=_text(vdi_info, "content_id") or ids.new(),
            metadata_of_pool=_text(vdi_info, "metadata_of_pool"),
            read_only=bool(vdi_info.get("read_only", False)),
            sm_config={**_sm_config(vdi_info), "vdi_type": "vhd"},
            created=timestamps.now(precise=True),
        )
        with self.tree_lock():
            self.new_volumes(rec.vdi)
            try:
                with self.step(f"creating the volume of VDI {rec.vdi}"):
                    volume, info = self.store.create(size, rec.vdi)
            except BaseException:
                with contextlib.suppress(Error, OSError):
                    self.owned.forget(rec.vdi)
                raise
            rec.volume = volume
            rec.virtual_size = int(info.virtual_size)
            try:
                self.put(rec, f"saving the record of new VDI {rec.vdi}")
            except BaseException:
                # nothing half made: the volume goes (else the collector would)
                with contextlib.suppress(Error, OSError):
                    self.store.remove(volume)
                    self.owned.forget(volume)
                raise
            if persistent is False:
                self._freeze(rec)
        log.info(
            "created VDI %s on volume %s (%d bytes)",
            rec.vdi,
            rec.volume,
            rec.virtual_size,
        )
        return self.vdi_info(rec)

    def destroy(self, vdi: str) -> None:
        with self.tree_lock():
            rec = self.get(vdi)
            with self.vdi_lock(rec.vdi):
                self._require_unused(rec.vdi, "destroy")
                # Only the record goes here: its leaf is then an unreferenced
                # volume, which the collector deletes (with any ancestors
                # nobody needs any more); a crash in between loses nothing.
                with self.step(f"removing the record of VDI {rec.vdi}"):
                    self.meta.remove(rec.vdi)
                    self.dps.forget(rec.vdi)
        self.request_gc()
        log.info("destroyed VDI %s", rec.vdi)

    def put(self, rec: VdiRecord, what: str) -> None:
        """Save a VDI record (atomically: a failure leaves the old one)."""
        with self.step(what):
            self.meta.put(rec)

    # --- metadata-only changes -------------------------------------------------

    def set_content_id(self, vdi: str, content_id: str) -> None:
        if not isinstance(content_id, str) or len(content_id) > MAX_TEXT:
            raise InvalidRequest("content_id must be a string")
        with self.tree_lock():
            rec = self.get(vdi)
            rec.content_id = content_id
            self.put(rec, f"saving the content_id of VDI {rec.vdi}")

    def update(self, vdi: str, **changes: Any) -> dict[str, Any]:
        """Change record fields (name_label, sm_config ...) atomically."""
        with self.tree_lock():
            rec = self.get(vdi)
            for k, v in changes.items():
                if not hasattr(rec, k) or k in ("vdi", "volume", "epoch_base"):
                    raise InvalidRequest(f"cannot set {k}")
                setattr(rec, k, v)
            self.put(rec, f"saving the record of VDI {rec.vdi}")
            return self.vdi_info(rec)

    # --- snapshot / clone ------------------------------------------------------

    def snapshot(self, vdi_info: dict[str, Any]) -> dict[str, Any]:
        return self._fork(vdi_info, snapshot=True)

    def clone(self, vdi_info: dict[str, Any]) -> dict[str, Any]:
        return self._fork(vdi_info, snapshot=False)

    def _fork(self, vdi_info: dict[str, Any], snapshot: bool) -> dict[str, Any]:
        if not isinstance(vdi_info, dict):
            raise InvalidRequest("vdi_info must be a struct")
        src_key = safe_name("vdi_info.vdi", vdi_info.get("vdi"))
        with self.tree_lock():
            src = self.get(src_key)
            with self.vdi_lock(src.vdi):
                self.store.check_not_busy(src.volume)
                key = ids.new()
                base = self.store.new_name()
                self.new_volumes(base, key)
                with self.step(f"freezing the content of VDI {src.vdi}"):
                    self.store.push_down(src.volume, base)
                with self.step(f"creating the volume of VDI {key}"):
                    other = self.store.snapshot(base, key)
                new = VdiRecord(
                    vdi=key,
                    volume=other,
                    name_label=_text(vdi_info, "name_label") or src.name_label,
                    name_description=_text(vdi_info, "name_description")
                    or src.name_description,
                    ty=_text(vdi_info, "ty") or src.ty,
                    content_id=src.content_id,
                    metadata_of_pool=src.metadata_of_pool,
                    is_a_snapshot=snapshot,
                    snapshot_time=(_text(vdi_info, "snapshot_time") or timestamps.now())
                    if snapshot
                    else "",
                    snapshot_of=src.vdi if snapshot else "",
                    read_only=bool(vdi_info.get("read_only", src.read_only)),
                    virtual_size=src.virtual_size,
                    persistent=True,
                    sm_config={
                        **src.sm_config,
                        **_sm_config(vdi_info),
                        "vdi_type": "vhd",
                    },
                    created=timestamps.now(precise=True),
                )
                self.put(new, f"saving the record of new VDI {key}")
                with self.step(f"hiding volume {base}"):
                    self.store.set_hidden(base, True)
        log.info(
            "%s of VDI %s: %s (volume %s over %s)",
            "snapshot" if snapshot else "clone",
            src.vdi,
            new.vdi,
            other,
            base,
        )
        return self.vdi_info(new)

    # --- persistence and epochs -----------------------------------------------

    def _freeze(self, rec: VdiRecord) -> str:
        """Make the VDI's current content a hidden base; the VDI moves to a child."""
        self.store.check_not_busy(rec.volume)
        base = self.store.new_name()
        self.new_volumes(base)
        with self.step(f"freezing the content of VDI {rec.vdi}"):
            self.store.push_down(rec.volume, base)
        rec.epoch_base = base
        rec.persistent = False
        self.put(rec, f"saving the record of VDI {rec.vdi}")
        with self.step(f"hiding volume {base}"):
            self.store.set_hidden(base, True)
        return base

    def set_persistent(self, vdi: str, persistent: bool) -> None:
        if not isinstance(persistent, bool):
            raise InvalidRequest("persistent must be a boolean")
        collect = False
        with self.tree_lock():
            rec = self.get(vdi)
            with self.vdi_lock(rec.vdi):
                if persistent:
                    if rec.persistent and rec.epoch_base is None:
                        return
                    rec.persistent = True
                    rec.epoch_base = None
                    self.put(rec, f"saving the record of VDI {rec.vdi}")
                    collect = True
                elif rec.epoch_base is None:
                    self._freeze(rec)
                elif rec.persistent:
                    rec.persistent = False
                    self.put(rec, f"saving the record of VDI {rec.vdi}")
        if collect:  # the old base may now be coalesced into the leaf
            self.request_gc()

    def epoch_begin(self, vdi: str) -> None:
        """A non-persistent VDI starts again from its frozen content."""
        with self.tree_lock():
            rec = self.get(vdi)
            if rec.persistent or rec.epoch_base is None:
                return
            with self.vdi_lock(rec.vdi):
                if any(s.activated for s in self.dps.states(rec.vdi).values()):
                    raise BackendError(
                        "VDI_IN_USE",
                        [f"VDI {rec.vdi} is activated: deactivate it first"],
                    )
                # The leaf is replaced in place by an empty child of the base
                # (one rename): the VDI keeps its leaf path, so an attach
                # made before still names the right image.
                with self.step(f"emptying the leaf of VDI {rec.vdi}"):
                    self.store.renew(rec.volume, rec.epoch_base)
        log.info(
            "epoch_begin of %s: leaf %s emptied over base %s",
            rec.vdi,
            rec.volume,
            rec.epoch_base,
        )

    def epoch_end(self, vdi: str) -> None:
        """Nothing to do: the next epoch_begin drops this epoch's writes."""
        self.get(vdi)

    # --- compose and similar content --------------------------------------------

    def compose(self, vdi1: str, vdi2: str) -> None:
        if vdi1 == vdi2:
            raise InvalidRequest("compose needs two different VDIs")
        with self.tree_lock():
            r1 = self.get(vdi1)
            r2 = self.get(vdi2)
            with self.vdi_lock(r1.vdi), self.vdi_lock(r2.vdi):
                self._require_unused(r2.vdi, "compose onto")
                self.store.check_not_busy(r1.volume)
                base = self.store.new_name()
                self.new_volumes(base)
                with self.step(f"freezing the content of VDI {r1.vdi}"):
                    self.store.push_down(r1.volume, base)
                    self.store.set_hidden(base, True)
                with self.step(f"re-basing VDI {r2.vdi}"):
                    self.store.rebase(r2.volume, base)
                r2.content_id = ids.new()
                self.put(r2, f"saving the record of VDI {r2.vdi}")
        self.request_gc()
        log.info(
            "composed %s (leaf %s) onto %s (base %s)", r2.vdi, r2.volume, r1.vdi, base
        )

    def similar_content(self, vdi: str) -> list[dict[str, Any]]:
        """VDIs sharing an ancestor volume with ``vdi``, fewest tree hops first."""
        rec = self.get(vdi)
        tree = self.store.tree()

        def ancestors(v: str) -> dict[str, int]:
            out: dict[str, int] = {}
            hops = 0
            while v is not None and v not in out:
                out[v] = hops
                node = tree.get(v)
                v = node.parent if node else None  # type: ignore[assignment]
                hops += 1
            return out

        mine = ancestors(rec.volume)
        scored = []
        for other in self.meta.records():
            if other.vdi == rec.vdi:
                continue
            theirs = ancestors(other.volume)
            common = [mine[v] + h for v, h in theirs.items() if v in mine]
            if common:
                scored.append((min(common), other.created, other.vdi, other))
        scored.sort(key=lambda t: t[:3])
        return [self.vdi_info(t[3]) for t in scored]

    # --- copy in ------------------------------------------------------------------

    def import_image(self, src_path: str, template: VdiRecord) -> dict[str, Any]:
        """A new VDI holding the flattened content of the image ``src_path``."""
        with self.tree_lock():
            name = self.store.new_name()
            self.new_volumes(name)
            with self.step("copying an image into a new volume"):
                volume, info = self.store.convert_from(src_path, name)
            rec = VdiRecord(
                vdi=ids.new(),
                volume=volume,
                name_label=template.name_label,
                name_description=template.name_description,
                ty=template.ty,
                content_id=template.content_id,
                metadata_of_pool=template.metadata_of_pool,
                read_only=template.read_only,
                virtual_size=int(info.virtual_size),
                sm_config={**template.sm_config, "vdi_type": "vhd"},
                created=timestamps.now(precise=True),
            )
            self.put(rec, f"saving the record of new VDI {rec.vdi}")
        return self.vdi_info(rec)
