"""LVStore: the VolumeStore of LVM SRs: one logical volume per volume, a VHD inside.

Volume ``v`` is the LV ``VHD-<v>`` of the SR's volume group.  The engine's
metadata (VDI records, GC journal) is on the SR's metadata volume (``MGT``,
ext4, mounted as the SR directory by the SR type); this store keeps its own
journal there too, in ``.sm/lvhd/``.

Sizes.  An LV holds what its VHD needs, in whole extents: a VDI's leaf is
*inflated* to the size of its VHD fully allocated before it can be written
(VDI.create, a read-write activation, a coalesce into a parent); a volume
that becomes a hidden parent is *deflated* to its VHD's current size.  Writes
past the LV fail cleanly (``vhd.NoSpace``), never into a neighbour.

Reading the tree.  ``tree()`` (the collector, similar_content) reads every
volume's footer and header straight from the physical volume at the LV's
offset (O_DIRECT: coherent with what the volumes' own devices wrote), after
one ``lvs`` for the whole VG: no activation, no command per volume.  SR.scan
needs only the LV sizes, from the same single ``lvs``.

Opening images.  Anything that opens an image (create, snapshot, coalesce,
info ...) first activates the volume and its chain on this host for the
call's own process (``smcommon.lvhd.activation``), and lets go at the end.

Crash safety, beyond the engine's own ordering:

- a new LV is named in the journal (``create-<v>``) before ``lvcreate`` and
  unnamed once its image is complete: a killed create leaves a journal entry,
  and ``cleanup_partial`` removes the LV (``volumes()`` never lists it);
- ``push_down(v)`` journals ``{v, base}``, renames ``VHD-v`` to the base and
  creates the new empty ``VHD-v`` over it: ``recover()`` (run under the SR
  lock before any tree change) finishes or undoes it;
- ``renew``/``rebase``/relocation build the replacement as ``VHD-<v>.new``
  and swap it in with ``lvremove VHD-v`` (the commit point) then
  ``lvrename``: a leftover ``.new`` is dropped while ``VHD-v`` exists, and
  renamed into place if it does not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from smcommon.engine.store import BaseStore, Node, load_vhd, vhd_call
from smcommon.errors import BackendError, Error
from smcommon.fileio import atomic_write_json, unlink_durable
from smcommon.lvhd.activation import Activations, flush, process_holder
from smcommon.lvm import Lv, Lvm, LvmError, Segment, Vg
from smcommon.paths import safe_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

LV_PREFIX = "VHD-"
NEW_SUFFIX = ".new"
MGT_LV = "MGT"
OWNER_TAG = "sm_owner="
SECTOR = 512
BLOCK = 2 * 1024 * 1024
SPAN = BLOCK + SECTOR  # a data block and its sector bitmap
LOCATORS = 3 * 8192  # the parent locator slots of a differencing image
COPY_CHUNK = 8 * 1024 * 1024


def meta_size(virtual_size: int) -> int:
    """Bytes of an empty VHD of ``virtual_size`` (differencing: the larger layout)."""
    entries = -(-virtual_size // BLOCK)
    bat = -(-entries * 4 // SECTOR) * SECTOR
    return SECTOR + 1024 + LOCATORS + bat + SECTOR


def full_size(virtual_size: int) -> int:
    """Bytes of a VHD of ``virtual_size`` with every block allocated."""
    return meta_size(virtual_size) + -(-virtual_size // BLOCK) * SPAN


def lv_name(volume: str) -> str:
    return LV_PREFIX + volume


def volume_of(lv: str) -> str | None:
    if lv.startswith(LV_PREFIX) and "." not in lv:
        return lv[len(LV_PREFIX) :]
    return None


def key_of(lv: str) -> str | None:
    """The activation key of an LV: its volume, or ``<volume>.new`` for a
    replacement being built."""
    if lv.startswith(LV_PREFIX) and lv.endswith(NEW_SUFFIX):
        return lv[len(LV_PREFIX) :]
    return volume_of(lv)


class LVStore(BaseStore):
    """Volumes as LVs holding VHDs (see the module doc)."""

    def __init__(
        self,
        sr_dir: Path,
        vg: str,
        lvm: Lvm,
        pv: str,
        activations: Activations,
        *,
        pe_start: int = 0,
        pe_count: int = 0,
        contiguous: bool = False,
        owner: str = "",
        vhd: Any = None,
    ) -> None:
        self.sr_dir = Path(sr_dir)
        self.vg = vg
        self.lvm = lvm
        self.pv = pv
        self.act = activations
        self.pe_start = pe_start  # where extent 0 lies on the PV
        self.pe_count = pe_count  # the PV's extents
        self.contiguous = contiguous  # loop activation: each LV in one piece, placed here
        self.owner = owner  # this host's owner tag: refuse to work if another took over
        self._vhd = vhd
        self._vg: Vg | None = None
        self._lvs: dict[str, Lv] | None = None
        self.jdir = self.sr_dir / ".sm" / "lvhd"
        self.holder = process_holder()
        self._pv_fd = -1

    def __del__(self) -> None:
        if getattr(self, "_pv_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pv_fd)
            self._pv_fd = -1

    @property
    def vhd(self) -> Any:
        if self._vhd is None:
            self._vhd = load_vhd()
        return self._vhd

    # --- the VG report (one lvs) ----------------------------------------------------

    def _report(self) -> dict[str, Lv]:
        if self._lvs is None:
            _drop_backing_cache(self.pv)
            vg, lvs = self.lvm.report(self.vg)
            if vg is None:
                raise BackendError("SR_VG_EMPTY", [f"volume group {self.vg} has no volumes"])
            if self.owner and f"{OWNER_TAG}{self.owner}" not in vg.tags:
                others = [t[len(OWNER_TAG):] for t in vg.tags if t.startswith(OWNER_TAG)]
                now = (f"is now owned by host {', '.join(others)}" if others
                       else "is no longer owned by this host")
                raise BackendError("SR_OWNER_CHANGED", [
                    f"volume group {self.vg} {now} (taken over): SR.detach it here"])
            self._vg = vg
            self._lvs = {lv.name: lv for lv in lvs}
        return self._lvs

    def refresh(self) -> None:
        """Forget the VG report: other processes changed the VG meanwhile (the
        engine calls this once it holds the SR lock; a long-lived collector
        process also before each copy)."""
        self._lvs = None
        self._vg = None

    def _lv(self, volume: str) -> Lv:
        lv = self._report().get(lv_name(volume))
        if lv is None:
            raise BackendError("VHD_MISSING", [f"volume {volume} ({lv_name(volume)}) is missing"])
        return lv

    def _refresh(self, names: Sequence[str]) -> None:
        """Re-read these LVs (after lvcreate/lvresize: their segments changed)."""
        report = self._report()
        for lv in self.lvm.lvs(self.vg, list(names)):
            report[lv.name] = lv

    @property
    def extent(self) -> int:
        self._report()
        assert self._vg is not None
        return self._vg.extent_size

    def _round(self, nbytes: int) -> int:
        e = self.extent
        return max(e, -(-nbytes // e) * e)

    # --- names and paths -------------------------------------------------------------

    def shared_lock_dir(self) -> Path:
        """The SR's tree and VDI locks: on the MGT volume (``.sm/locks``), which
        only the host owning the VG mounts."""
        from smcommon.engine.locks import shared_lock_dir

        return shared_lock_dir(self.sr_dir)

    def new_name(self) -> str:
        return str(uuid.uuid4())

    def path(self, volume: str) -> str:
        return self.act.path(safe_name("volume", volume))

    def exists(self, volume: str) -> bool:
        return lv_name(volume) in self._report()

    def volumes(self) -> list[str]:
        pending = self._pending_creates()
        names = (volume_of(n) for n in self._report())
        return sorted(v for v in names if v is not None and v not in pending)

    def entries(self) -> list[str]:
        """Every LV of the VG but MGT, in the engine's file names (what
        ``engine.foreign`` surveys): ``VHD-<v>`` is ``<v>.vhd``, a replacement
        ``VHD-<v>.new`` is ``<v>.vhd.new``, any other LV keeps its name."""
        out = []
        for name in self._report():
            if name == MGT_LV:
                continue
            key = key_of(name)
            if key is None:
                out.append(name)
            elif key.endswith(NEW_SUFFIX):
                out.append(key[: -len(NEW_SUFFIX)] + ".vhd" + NEW_SUFFIX)
            else:
                out.append(key + ".vhd")
        return sorted(out)

    # --- the store's journal -----------------------------------------------------------

    def _journal(self, kind: str, volume: str, doc: dict[str, Any]) -> Path:
        self.jdir.mkdir(parents=True, exist_ok=True)
        path = self.jdir / f"{kind}-{volume}.json"
        atomic_write_json(path, {"op": kind, "volume": volume, **doc})
        return path

    def _pending_creates(self) -> set[str]:
        try:
            names = os.listdir(self.jdir)
        except FileNotFoundError:
            return set()
        return {n[len("create-") : -5] for n in names
                if n.startswith("create-") and n.endswith(".json")}

    @contextlib.contextmanager
    def _new_lv(self, volume: str, size: int, temp: bool = False,
                future: int = 0) -> Iterator[str]:
        """lvcreate VHD-<volume> under a journal entry, which goes when the block
        succeeds; or, ``temp``, the replacement VHD-<volume>.new (its suffix is
        its journal).  ``future``: the size it may grow to (placement)."""
        lv = lv_name(volume) + (NEW_SUFFIX if temp else "")
        j = None if temp else self._journal("create", volume, {"lv": lv})
        if temp and lv in self._report():
            self._remove_lv(lv)
        self._lvcreate(lv, self._round(size), self._round(max(size, future)))
        yield lv
        if j is not None:
            unlink_durable(j)

    def _lvcreate(self, lv: str, size: int, future: int) -> None:
        """Create ``lv``; in one piece, placed by this store (its record then
        needs no second ``lvs``), where the loop activation needs it."""
        report = self._report()
        if not self.contiguous:
            self.lvm.lvcreate(self.vg, lv, size)
            report[lv] = Lv(lv, size)
            return
        for attempt in (1, 2):
            start = self._place(size // self.extent, future // self.extent)
            if start is None:
                raise LvmError("LVM_NO_SPACE", f"lvcreate {self.vg}/{lv}",
                               f"no {size // self.extent} free extents in one piece on "
                               f"{self.pv}")
            count = size // self.extent
            try:
                self.lvm.lvcreate(self.vg, lv, size, contiguous=True,
                                  where=f"{self.pv}:{start}-{start + count - 1}")
            except LvmError as e:
                if attempt == 2 or e.code != "LVM_NO_SPACE":
                    raise
                self._lvs = None  # another process allocated meanwhile: look again
                report = self._report()
                continue
            report[lv] = Lv(lv, size, segments=(Segment(0, count, self.pv, start),))
            return

    def _place(self, count: int, future: int) -> int | None:
        """First extent for a new LV of ``count`` extents that may grow to
        ``future``: at the end of the largest free range, less its growth, so
        it can grow in place and the next LVs go below it."""
        used = sorted((s.pv_start, s.pv_start + s.count)
                      for lv in self._report().values() for s in lv.segments
                      if s.pv == self.pv)
        free = []
        pos = 0
        for a, b in used:
            if a > pos:
                free.append((pos, a))
            pos = max(pos, b)
        total = self.pe_count or pos
        if total > pos:
            free.append((pos, total))
        fits = [(b - a, a, b) for a, b in free if b - a >= count]
        if not fits:
            return None
        _, a, b = max(fits)
        return max(a, b - max(count, future))

    def _journals(self, kind: str) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in sorted(self.jdir.glob(f"{kind}-*.json")) if self.jdir.is_dir() else []:
            try:
                doc = json.loads(path.read_text())
                if not isinstance(doc, dict):
                    raise TypeError("not an object")
                safe_name("volume", doc.get("volume"))
            except (OSError, ValueError, TypeError, Error):
                unlink_durable(path)  # a torn write cannot happen (atomic): garbage
                continue
            out.append((path, doc))
        return out

    def recover(self) -> list[str]:
        """Finish or undo what a killed call left (under the SR lock), and give
        the datapaths it had moved their volumes back."""
        done: list[str] = []
        swaps = {doc["volume"]: (path, doc) for path, doc in self._journals("swap")}
        report = self._report()
        for name in sorted(report):
            if not (name.startswith(LV_PREFIX) and name.endswith(NEW_SUFFIX)):
                continue
            target = name[: -len(NEW_SUFFIX)]
            volume = target[len(LV_PREFIX):]
            if target in report:  # never committed (the commit removes the target)
                self._remove_lv(name, force=True)
                done.append(f"dropped {name}")
            else:
                self.act.forget(volume)  # a device of the removed LV
                self._rename_lv(name, target)
                done.append(f"{name} -> {target}")
            for user in swaps.get(volume, (None, {}))[1].get("users", []):
                self.act.hold([(volume, self._lv(volume))], str(user))
        for path, doc in self._journals("push_down"):
            v = doc["volume"]
            b = safe_name("base", doc.get("base"))
            if self.exists(b):
                # the rename committed it
                if not self.exists(v) and v in self.act.active():
                    # killed between lvrename and moving the device's record
                    self.act.rename(v, b, lv_name(b), keep_link=True)
                key = f"{v}{NEW_SUFFIX}"
                if self.exists(v) and v not in self._pending_creates():
                    # the new leaf was whole (its create journal gone): a VM may
                    # have written into it already; its name leads to it now
                    if key in self.act.active():
                        self.act.rename(key, v, lv_name(v))
                    users = [u for u in doc.get("users", []) if str(u).startswith("dp:")]
                    for user in users:  # a kill before they were moved to it
                        self.act.hold([(v, self._lv(v))], str(user))
                    done.append(f"push_down of {v} over {b} was complete")
                else:
                    # (re)make the empty leaf over the base: nobody wrote into it
                    self.act.forget(key)
                    if self.exists(v):
                        self._remove_lv(lv_name(v), force=True)
                    users = [*doc.get("users", []), *self.act.holders(b)]
                    self._child(v, b, users=list(dict.fromkeys(users)))
                    done.append(f"push_down of {v} over {b} finished")
            unlink_durable(path)
        for path, _ in swaps.values():
            unlink_durable(path)  # the .new rule above finished or undid it
        return done

    def cleanup_partial(self, owned: set[str] | None = None) -> list[str]:
        """Journal-named LVs of killed creates, leftovers of swaps, dead holders
        (every LV this removes is named by the store's own journal: ``owned``
        is not needed to tell them from foreign LVs)."""
        gone = self.recover()
        for volume in sorted(self._pending_creates()):
            path = self.jdir / f"create-{volume}.json"
            try:
                lv = json.loads(path.read_text()).get("lv") or lv_name(volume)
            except (OSError, ValueError, AttributeError):
                lv = lv_name(volume)
            if lv in self._report():
                self._remove_lv(lv)
                gone.append(lv)
            unlink_durable(path)
        self.act.release([], self.holder)  # sweeps holders of dead processes
        gone += [f"orphan device {d}" for d in self.act.sweep_orphans()]
        return gone

    def needs_recovery(self) -> bool:
        """Did a killed call leave a step that leaves a VDI without its leaf
        until ``recover`` runs (a push_down or a swap journal)?  No lvm command."""
        try:
            return any(n.startswith(("push_down-", "swap-")) for n in os.listdir(self.jdir))
        except FileNotFoundError:
            return False

    # --- LV changes (activation dropped first) -------------------------------------------

    def _remove_lv(self, lv: str, force: bool = False) -> None:
        """lvremove, its device first (``force``: whoever holds it: recovery)."""
        key = key_of(lv)
        if key is not None:
            if force:
                self.act.forget(key)
            else:
                self.act.drop(key, self.holder)
        self.lvm.lvremove(self.vg, lv, missing_ok=True)
        self._report().pop(lv, None)
        if key is not None and not key.endswith(NEW_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._writes_file(key))  # its write count (``stamp``)

    def _rename_lv(self, old: str, new: str, keep_link: bool = False) -> list[str]:
        """lvrename; an activation of the LV goes with it (``keep_link``: the old
        name still leads to the device until something replaces it).  Its holders."""
        new_key = key_of(new)
        if new_key is not None:
            self.act.drop(new_key, self.holder)
        self.lvm.lvrename(self.vg, old, new)
        report = self._report()
        was = report.pop(old)
        report[new] = Lv(new, was.size, was.attr, was.tags, was.segments)
        old_key = key_of(old)
        if old_key is None or new_key is None:
            return []
        return self.act.rename(old_key, new_key, new, keep_link=keep_link)

    def _resize(self, volume: str, size: int) -> None:
        """The LV to ``size`` bytes (rounded to extents); keeps it in one piece."""
        lv = self._lv(volume)
        size = self._round(size)
        if size == lv.size:
            return
        self.act.drop(volume, self.holder)
        try:
            self.lvm.lvresize(self.vg, lv.name, size, contiguous=self.contiguous)
        except LvmError as e:
            if not (self.contiguous and size > lv.size and e.code == "LVM_NO_SPACE"):
                raise
            self._relocate(volume, size)
            return
        segs = lv.segments
        if self.contiguous and len(segs) == 1:  # grown or shrunk at its end, in place
            segs = (Segment(0, size // self.extent, segs[0].pv, segs[0].pv_start),)
        self._report()[lv.name] = Lv(lv.name, size, lv.attr, lv.tags, segs)

    def _relocate(self, volume: str, size: int) -> None:
        """Grow a one-piece LV whose next extents are taken: copy it to a new LV
        of ``size`` elsewhere and swap it in (``.new``: see the module doc)."""
        old = self._lv(volume)
        used = self._image_end(old) + SECTOR
        with self._new_lv(volume, size, temp=True) as new:
            key = f"{volume}{NEW_SUFFIX}"
            src, dst = self.act.hold([(volume, old), (key, self._report()[new])], self.holder)
            try:
                _copy(src, dst, used)
            finally:
                self.act.release([volume, key], self.holder)
        self._swap_in(volume, new)
        log.info("relocated %s to grow it to %d bytes (%d bytes copied)", volume, size, used)

    def _swap_in(self, volume: str, new: str) -> None:
        """Replace VHD-<volume> by the complete LV ``new``: remove (the commit
        point), then rename; the journal entry tells datapath calls, which do
        not take the SR lock, that ``recover`` must run first if we die.  An
        attached VDI's datapaths hold the new LV before, and its path names it
        after (its old device goes: epoch_begin refuses an activated VDI)."""
        users = [h for h in self.act.holders(volume) if h.startswith("dp:")]
        j = self._journal("swap", volume, {"new": new, "users": users})
        for user in users:
            self.act.release([volume], user)
        self._remove_lv(lv_name(volume))
        self._rename_lv(new, lv_name(volume))
        for user in users:
            self.act.hold([(volume, self._lv(volume))], user)
        unlink_durable(j)

    def inflate(self, volume: str, size: int | None = None) -> None:
        """Make the LV hold its VHD fully allocated (or ``size`` bytes)."""
        lv = self._lv(volume)
        need = size if size is not None else full_size(self._head(lv)[0])
        if self._round(need) > lv.size:
            self._resize(volume, need)

    def deflate(self, volume: str) -> None:
        """Shrink the LV to what its VHD uses now (not while active for a datapath)."""
        lv = self._lv(volume)
        if any(h != self.holder for h in self.act.holders(volume)):
            return
        need = self._round(self._image_end(lv) + SECTOR)
        if need < lv.size:
            self._resize(volume, need)

    # --- reading headers from the PV ------------------------------------------------------

    def _pread(self, lv: Lv, length: int, offset: int) -> bytes:
        """Bytes ``offset``.. of an LV, read from the PV (O_DIRECT, aligned)."""
        if offset + length > lv.size:
            raise BackendError("VHD_CORRUPT", [f"{lv.name}: read past the end of the LV"])
        pe_start = self.pe_start
        if self._pv_fd < 0:
            try:
                self._pv_fd = os.open(self.pv, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as e:
                raise BackendError("SR_PV_UNREADABLE", [f"{self.pv}: {e.strerror}"]) from None
        out = bytearray()
        pos = offset
        while len(out) < length:
            seg = next((s for s in lv.segments
                        if s.lv_start * self.extent <= pos < (s.lv_start + s.count) * self.extent),
                       None)
            if seg is None:
                raise BackendError("VHD_CORRUPT", [f"{lv.name}: no segment at {pos}"])
            seg_end = (seg.lv_start + seg.count) * self.extent
            n = min(length - len(out), seg_end - pos)
            at = pe_start + seg.pv_start * self.extent + (pos - seg.lv_start * self.extent)
            if seg.pv != self.pv:
                raise BackendError("SR_PV_MISSING", [f"{lv.name} lies on {seg.pv}, not {self.pv}"])
            out += _direct_read(self._pv_fd, self.pv, at, n)
            pos += n
        return bytes(out)

    def _head(self, lv: Lv) -> tuple[int, str | None, bool, bytes]:
        """(virtual size, parent volume, hidden, uuid) of the VHD in ``lv``."""
        from smcommon.vhd import format as fmt
        from smcommon.vhd.image import device_tail

        def pread(n: int, at: int) -> bytes:
            return self._pread(lv, n, at)

        try:
            head = fmt.Footer.from_bytes(pread(512, 0), f"{lv.name}: footer copy")
            footer = head
            end = device_tail(pread, lv.size, lv.name)
            with contextlib.suppress(Error):
                tail = fmt.Footer.from_bytes(pread(512, end), f"{lv.name}: footer")
                if tail.uuid == head.uuid:
                    footer = tail  # the tail is written first: it wins
            parent = None
            if footer.disk_type == fmt.DISK_DIFFERENCING:
                # children are made in the SR's device directory: the parent's
                # name there is its volume
                header = fmt.Header.from_bytes(pread(1024, footer.data_offset))
                parent = os.path.basename(header.parent_name) or None
        except Error as e:
            raise BackendError("VHD_CORRUPT", [f"{lv.name}: {e}"]) from None
        return footer.current_size, parent, bool(footer.hidden), footer.uuid

    def _image_end(self, lv: Lv) -> int:
        from smcommon.vhd.image import device_tail

        try:
            return device_tail(lambda n, at: self._pread(lv, n, at), lv.size, lv.name)
        except Error as e:
            raise BackendError("VHD_CORRUPT", [f"{lv.name}: {e}"]) from None

    def node(self, volume: str) -> Node:
        lv = self._lv(volume)
        vsize, parent, hidden, _ = self._head(lv)
        return Node(volume, parent, hidden, vsize, lv.size)

    def tree(self, strict: bool = False) -> dict[str, Node]:
        out = {}
        for v in self.volumes():
            try:
                out[v] = self.node(v)
            except Error:
                if strict:
                    raise
        return out

    def chain_of(self, volume: str) -> list[str]:
        """``volume`` and its ancestors, from the headers (no activation)."""
        out = [volume]
        parent = self.node(volume).parent
        while parent is not None:
            if parent in out or len(out) > 64:
                raise BackendError("VHD_CORRUPT", [f"parent loop in the chain of {volume}"])
            if not self.exists(parent):
                raise BackendError("VHD_CHAIN_BROKEN",
                                   [f"{parent} of the chain of {volume} is missing"])
            out.append(parent)
            parent = self.node(parent).parent
        return out

    # --- holding volumes open for this process ------------------------------------------------

    @contextlib.contextmanager
    def held(self, volume: str, *, parents: bool = True, extra: Sequence[str] = (),
             write: bool = False) -> Iterator[str]:
        """Activate ``volume`` (and its chain, and ``extra`` volumes and their
        chains) for this process; yield its path; let go at the end.
        ``write``: the caller writes into ``volume`` (counted, see ``stamp``)."""
        if write:
            self._count_write(volume)  # before and after: a stamp taken meanwhile differs
        keys: list[str] = []
        for v in (volume, *extra):
            for k in (self.chain_of(v) if parents else [v]):
                if k not in keys:
                    keys.append(k)
        self.act.hold([(k, self._lv(k)) for k in keys], self.holder)
        try:
            yield self.path(volume)
        finally:
            self.act.release(keys, self.holder)
            if write:
                self._count_write(volume)

    def check_not_busy(self, volume: str) -> None:
        """Refuse at once (VDI_IN_USE) if a writer holds ``volume``'s image open
        (as FileStore: a VM backend holds smcommon.vhd's lock while it writes)."""
        import fcntl

        try:
            fd = os.open(self.path(volume), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendError("VDI_IN_USE", [
                (f"volume {volume} is open for writing by a VM backend; a snapshot, clone "
                "or compose of it needs the backend deactivated first")]) from None
        finally:
            os.close(fd)

    # --- images ------------------------------------------------------------------------------

    def create(self, size: int, name: str | None = None) -> tuple[str, Any]:
        name = name or self.new_name()
        with self._new_lv(name, full_size(size)), self.held(name, parents=False) as p:
            info = vhd_call("create", self.vhd.create, p, size)
        return name, info

    def _child(self, name: str, parent: str, temp: bool = False, size: int = 0,
               users: Sequence[str] = ()) -> str:
        """A new LV VHD-<name> (``temp``: VHD-<name>.new) holding an empty child
        of ``parent``, of ``size`` bytes (default: the child's metadata); its LV.
        ``users``: datapaths that held the volume before (a push_down of an
        active VDI): the new leaf is made whole (a writer is there) and active
        for them too, so their path names it."""
        vsize = self.node(parent).virtual_size
        users = [u for u in users if u.startswith("dp:")]
        if users:
            size = max(size, full_size(vsize))
        # built under its replacement's key: the name leads to a new image only
        # once it is whole (an attached VDI's path keeps its old device till then)
        key = f"{name}{NEW_SUFFIX}"
        with self._new_lv(name, size or meta_size(vsize), temp, full_size(vsize)) as made, \
                self.held(parent) as ppath:
            self.act.hold([(key, self._report()[made])], self.holder)
            try:
                vhd_call("snapshot", self.vhd.snapshot, ppath, self.path(key))
                for user in users:
                    self.act.hold([(key, self._report()[made])], user)
            except BaseException:
                self.act.release([key], self.holder)
                raise
        # the LV is whole and its create journal gone: only now does the name
        # lead to it (``recover`` relies on this order: a VM may write into
        # the new leaf as soon as its path names it)
        try:
            if not temp:
                self.act.rename(key, name, made)
                key = name
        finally:
            self.act.release([key], self.holder)
        return made

    def snapshot(self, parent: str, name: str | None = None) -> str:
        name = name or self.new_name()
        self._child(name, parent)
        return name

    def push_down(self, volume: str, base: str | None = None) -> str:
        """Freeze ``volume``'s content as a new base (named ``base`` if given);
        ``volume`` becomes its empty child (same name).  Journaled: see the
        module doc."""
        self.check_not_busy(volume)
        base = base or self.new_name()
        users = [h for h in self.act.holders(volume) if h.startswith("dp:")]
        j = self._journal("push_down", volume, {"base": base, "users": users})
        # an attached VDI's path leads to the old device (now the base: what it
        # writes meanwhile is in the base, where its data is) until its new
        # leaf is whole
        holders = self._rename_lv(lv_name(volume), lv_name(base), keep_link=True)
        self._child(volume, base, users=holders)
        unlink_durable(j)
        return base

    def replace(self, src: str, dst: str) -> None:
        """Volume ``src`` takes ``dst``'s name (``dst`` removed first).  Its
        callers (the collector) journal it: a repeat finishes it."""
        if self.exists(src):
            self._remove_lv(lv_name(dst))
            self._rename_lv(lv_name(src), lv_name(dst))

    def renew(self, volume: str, parent: str) -> None:
        """Replace ``volume`` by a new empty child of ``parent``."""
        self.check_not_busy(volume)
        self._swap_in(volume, self._child(volume, parent, temp=True))

    def rebase(self, volume: str, parent: str) -> None:
        """Put ``volume``'s own data over ``parent`` (see FileStore.rebase)."""
        vhd = self.vhd
        if self.node(volume).parent is not None:
            self.set_parent(volume, parent)
            return
        new = self._child(volume, parent, temp=True,
                          size=full_size(self.node(volume).virtual_size))
        key = f"{volume}{NEW_SUFFIX}"
        with self.held(volume) as src, self.held(parent):
            (tmp,) = self.act.hold([(key, self._report()[new])], self.holder)
            try:
                for off, length, depth in vhd_call("allocation_map", vhd.allocation_map, src):
                    if depth != 1:
                        continue
                    end = off + length
                    while off < end:
                        n = min(COPY_CHUNK, end - off)
                        vhd_call("write", vhd.write, tmp, off,
                                 vhd_call("read", vhd.read, src, off, n))
                        off += n
            finally:
                self.act.release([key], self.holder)
        self._swap_in(volume, new)

    def remove(self, volume: str) -> bool:
        if not self.exists(volume):
            return False
        self._remove_lv(lv_name(volume))
        return True

    def info(self, volume: str) -> Any:
        with self.held(volume) as p:
            return vhd_call("info", self.vhd.info, p)

    def chain(self, volume: str) -> list[str]:
        return self.chain_of(volume)

    def physical_utilisation(self, volume: str) -> int:
        lv = self._report().get(lv_name(volume))
        return lv.size if lv is not None else 0

    def set_hidden(self, volume: str, hidden: bool) -> None:
        with self.held(volume, parents=False) as p:
            vhd_call("set_hidden", self.vhd.set_hidden, p, hidden)
        if hidden:
            self.deflate(volume)

    def set_parent(self, child: str, parent: str, live_ok: bool = False) -> None:
        """Re-link ``child`` to ``parent``; ``live_ok``: as FileStore.set_parent
        (a child a running VM holds is re-linked without its image lock)."""
        from smcommon.engine.store import live_lock_wait
        from smcommon.vhd.errors import Busy
        from smcommon.vhd.live import set_parent_live

        keys = [child, *self.chain_of(parent)]
        self.act.hold([(k, self._lv(k)) for k in keys], self.holder)
        try:
            c, p = self.path(child), self.path(parent)
            if not live_ok:
                vhd_call("set_parent", self.vhd.set_parent, c, p)
                return
            try:
                vhd_call(
                    "set_parent", self.vhd.set_parent, c, p, lock_timeout=live_lock_wait()
                )
            except Busy:
                vhd_call("set_parent_live", set_parent_live, c, p)
        finally:
            self.act.release(keys, self.holder)

    def stamp(self, volume: str) -> list[int] | None:
        """What changes when ``volume`` is written (a leaf merge's check that
        its leaf was not written meanwhile): the LV's size, the image's end
        and a checksum of its footer, header and BAT, read from the PV, and
        the count of writable holds (``held(write=True)``: writes into
        blocks already allocated change no metadata)."""
        import zlib

        lv = self._report().get(lv_name(volume))
        if lv is None:
            return None
        try:
            from smcommon.vhd import format as fmt

            end = self._image_end(lv)
            head = fmt.Footer.from_bytes(self._pread(lv, 512, 0))
            meta = self._pread(lv, 512, 0) + self._pread(lv, 512, end)
            if head.disk_type != fmt.DISK_FIXED:
                header = fmt.Header.from_bytes(self._pread(lv, 1024, head.data_offset))
                meta += self._pread(lv, 4 * header.max_table_entries, header.table_offset)
        except Error:
            return None
        return [lv.size, end, zlib.crc32(meta), self._writes(volume)]

    def _writes_file(self, volume: str) -> Path:
        return self.jdir / f"writes-{safe_name('volume', volume)}"

    def _writes(self, volume: str) -> int:
        try:
            return int(self._writes_file(volume).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def _count_write(self, volume: str) -> None:
        """One more writable hold of ``volume`` (``stamp``); no fsync: a stamp
        only needs to differ while the machine stays up."""
        self.jdir.mkdir(parents=True, exist_ok=True)
        path = self._writes_file(volume)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(str(self._writes(volume) + 1))
        os.replace(tmp, path)

    def check(self, volume: str) -> list[str]:
        with self.held(volume) as p:
            return list(vhd_call("check", self.vhd.check, p))

    def coalesce(self, child: str, progress: Any = None) -> int:
        self.refresh()  # the collector's copy runs without the SR lock
        chain = self.chain_of(child)
        if len(chain) < 2:
            raise BackendError("VHD_NO_PARENT", [f"{child} has no parent to coalesce into"])
        parent = chain[1]
        plv = self._lv(parent)
        # room for every block of the child, and a larger BAT if the child is larger
        grow = self._allocated_bytes(self._lv(child)) + meta_size(self.node(child).virtual_size)
        self.inflate(parent, self._image_end(plv) + SECTOR + grow)
        with self.held(child) as p:
            # the parent is written without its lock: every reader reads it
            # through the child (the collector's rule, FileStore.coalesce)
            n = int(vhd_call("coalesce", self.vhd.coalesce, p, shadowed=True,
                             on_batch=progress))
        if self.node(parent).hidden:
            self.deflate(parent)
        return n

    def _allocated_bytes(self, lv: Lv) -> int:
        from smcommon.vhd import format as fmt

        head = fmt.Footer.from_bytes(self._pread(lv, 512, 0))
        header = fmt.Header.from_bytes(self._pread(lv, 1024, head.data_offset))
        raw = self._pread(lv, 4 * header.max_table_entries, header.table_offset)
        bat = fmt.Bat.from_bytes(raw, header.max_table_entries)
        return bat.allocated_count() * (header.block_size + header.bitmap_size)

    def resize(self, volume: str, size: int) -> Any:
        self.inflate(volume, full_size(size))
        with self.held(volume, parents=False) as p:
            return vhd_call("resize", self.vhd.resize, p, size)

    def convert_from(self, src_path: str, name: str | None = None) -> tuple[str, Any]:
        src = vhd_call("info", self.vhd.info, src_path)
        name = name or self.new_name()
        with self._new_lv(name, full_size(int(src.virtual_size))), \
                self.held(name, parents=False) as p:
            info = vhd_call("convert", self.vhd.convert, src_path, p)
        return name, info

    # --- activation for datapaths ---------------------------------------------------------------

    def attach_volume(self, volume: str, read_write: bool) -> None:
        """VDI.attach: a writable leaf's LV grown to hold all its data, then the
        VDI's chain active on this host (its attach_info path exists) until
        detach_volume."""
        holder = f"dp:{volume}"
        if read_write:
            self.check_can_grow(volume)
            self.inflate(volume)
        keys = self.chain_of(volume)
        self.act.hold([(k, self._lv(k)) for k in keys], holder)

    def activate(self, volume: str, read_write: bool) -> None:
        """VDI.activate: the chain is active since the attach; the image checked."""
        self.attach_volume(volume, read_write)  # (a no-op when nothing changed)
        path = self.path(volume)
        problems = vhd_call("check", self.vhd.check, path)
        if problems:
            raise BackendError("VHD_CORRUPT", [path, *problems])

    def check_can_grow(self, volume: str) -> None:
        lv = self._lv(volume)
        if self._round(full_size(self._head(lv)[0])) > lv.size and any(
            h != self.holder for h in self.act.holders(volume)
        ):
            raise BackendError("VDI_IN_USE", [
                (f"volume {volume} is attached read-only on this host: detach it before "
                "attaching it read-write (its volume must grow first)")])

    def deactivate(self, volume: str) -> None:
        """VDI.deactivate: what the VM wrote reaches the LUN (the chain stays
        active until the detach)."""
        flush(self.path(volume))

    def detach_volume(self, volume: str) -> None:
        """VDI.detach: the datapath lets go of the chain; a parent frozen while it
        was active (a snapshot of an attached VDI) is shrunk now that it is not."""
        released = self.act.release_holder(f"dp:{volume}")
        for v in released:
            if v != volume and v not in self.act.active():
                with contextlib.suppress(Error):
                    if self.exists(v) and self._head(self._lv(v))[2]:
                        self.deflate(v)

    def space(self) -> tuple[int, int]:
        self._report()
        assert self._vg is not None
        return self._vg.size, self._vg.free


def _direct_read(fd: int, dev: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of ``dev`` (``fd`` opened O_DIRECT): aligned
    to 4 KiB, so the page cache of the LVs' own devices is never in the way."""
    align = 4096
    start = offset // align * align
    stop = -(-(offset + length) // align) * align
    buf = mmap.mmap(-1, stop - start)
    try:
        got = os.preadv(fd, [buf], start)
        if got < stop - start and got < offset + length - start:
            raise BackendError("SR_PV_UNREADABLE", [f"{dev}: short read at {offset}"])
        return bytes(buf[offset - start : offset - start + length])
    except OSError as e:
        code = "SR_PV_UNREADABLE" if e.errno != errno.EINVAL else "SR_PV_UNALIGNED"
        raise BackendError(code, [f"{dev}: {e.strerror}"]) from None
    finally:
        buf.close()


def _copy(src: str, dst: str, length: int) -> None:
    s = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        d = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while pos < length:
                chunk = os.pread(s, min(COPY_CHUNK, length - pos), pos)
                if not chunk:
                    break
                os.pwrite(d, chunk, pos)
                pos += len(chunk)
            os.fsync(d)
        finally:
            os.close(d)
    finally:
        os.close(s)


def _drop_backing_cache(dev: str) -> None:
    """Drop the page cache of the file behind a loop device ``dev`` (the
    kernel-less initiator's FUSE export of the LUN), so that lvm reads the VG
    metadata another host wrote through its own path to the LUN, not a copy
    this host's loop device cached (an owner tag changed by a takeover was
    missed).  No-op for any other device, or if it cannot be done."""
    name = os.path.basename(os.path.realpath(dev))
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            backing = f.read().strip()
        fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
