"""The garbage collector of an SR's VHD tree, journaled and restartable.

This module owns ``<sr dir>/.sm/gc.json`` (the journal of the coalesce in
progress) and ``<sr dir>/.sm/gc-last.json`` (the report of the last run, for
Query.diagnostics).  The collector always runs under the SR lock (callers:
VDI.destroy and VDI.compose after they change the tree, the extra method
``SR.gc``, and ``SrEngine.tree_lock`` which finishes a journaled step left by
a killed process before any other tree change).

One run:

1. finish the journaled coalesce, if any;
2. remove temp files and half-written copies of killed processes;
3. delete volumes nobody needs: no children, and no VDI record names them
   (as its leaf or as its epoch base) - repeated, since deleting a leaf can
   leave its parent childless;
4. hide unreferenced volumes that have children (a snapshot killed before
   its last step), and un-hide VDI leaves;
5. coalesce every hidden, unreferenced parent P that has a single child C:
   C's sectors are copied into P (``vhd.coalesce``), then P takes C's place.
   If C is a VDI's leaf, P is renamed over C (the VDI keeps its leaf name,
   so its attach_info path stays valid) and un-hidden; otherwise C's
   children are re-linked to P (``vhd.set_parent``), an epoch base C is
   re-pointed to P, and C is deleted.  An epoch base is never
   coalesced into (it must keep the content a non-persistent VDI returns to).

Nothing destructive happens when a VDI record or a volume header cannot be
read (the tree would be incomplete), and a chain any VDI of which has a
non-Detached datapath is never touched: it is skipped and the report says so.
The VDIs whose chains a coalesce changes are locked (VDI locks) around it.

Journal: before the copy, ``{"step": "copy", parent, child, grandchildren,
hidden}``; after it, ``"step": "switch"``.  A restart at "copy" copies again
(C is still what the VDI reads, so the copy is idempotent); a restart at
"switch" redoes the rename or re-link/re-point/delete steps, all idempotent,
and never copies again (P may already be written through a VDI).  VDI.attach
refuses a VDI whose volume a pending journal names (GC_IN_PROGRESS), so no
writer appears between a crash and the resumption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field

from smcommon import timestamps
from smcommon.engine.meta import read_json
from smcommon.errors import Error, LockTimeout
from smcommon.fileio import atomic_write_json, unlink_durable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from smcommon.engine.sr import SrEngine
    from smcommon.engine.store import Node

log = logging.getLogger(__name__)

LOCK_TRY = 1.0  # seconds the collector waits for a VDI lock before skipping


@dataclass
class Report:
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    resumed: str = ""
    deleted: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    unhidden: list[str] = field(default_factory=list)
    coalesced: list[str] = field(default_factory=list)
    bytes_coalesced: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"deleted {len(self.deleted)}",
            f"coalesced {len(self.coalesced)} ({self.bytes_coalesced} bytes)",
            f"hidden {len(self.hidden)}",
        ]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}")
        if self.errors:
            parts.append(f"errors {len(self.errors)}")
        return ", ".join(parts)


class Collector:
    """The collector of one SR; the caller holds the SR lock."""

    def __init__(self, engine: SrEngine) -> None:
        self.eng = engine
        self.meta = engine.meta
        self.store = engine.store
        self.journal_path = engine.meta.gc_file
        self.last_path = engine.meta.sm_dir / "gc-last.json"

    # --- the journal -------------------------------------------------------------

    def journal(self) -> dict[str, Any] | None:
        doc = read_json(self.journal_path)
        return doc if isinstance(doc, dict) else None

    def resume(self, report: Report | None = None) -> None:
        """Finish the coalesce a killed collector left half done."""
        j = self.journal()
        if j is None:
            if self.journal_path.exists():
                unlink_durable(self.journal_path)
            return
        parent, child = str(j.get("parent")), str(j.get("child"))
        log.warning(
            "resuming interrupted coalesce of %s into %s at step %s",
            child,
            parent,
            j.get("step"),
        )
        if report is not None:
            report.resumed = f"coalesce {child} into {parent} at step {j.get('step')}"
        if j.get("step") == "copy":
            if not (self.store.exists(child) and self.store.exists(parent)):
                unlink_durable(self.journal_path)
                return
            n = self.store.coalesce(child)
            if report is not None:
                report.bytes_coalesced += n
            j["step"] = "switch"
            atomic_write_json(self.journal_path, j)
        self._switch(j)

    def _switch(self, j: dict[str, Any]) -> None:
        parent, child = str(j["parent"]), str(j["child"])
        if j.get("leaf"):
            # C is a VDI's leaf: the merged image P takes C's name.
            if self.store.exists(parent):
                self.store.replace(parent, child)
            if self.store.exists(child):
                self.store.set_hidden(child, False)
            unlink_durable(self.journal_path)
            return
        for g in j.get("grandchildren", []):
            if self.store.exists(g):
                self.store.set_parent(g, parent)
        for rec in self.meta.records():
            changed = False
            if rec.volume == child:
                rec.volume = parent
                changed = True
            if rec.epoch_base == child:
                rec.epoch_base = parent
                changed = True
            if changed:
                self.meta.put(rec)
        if self.store.exists(parent):
            self.store.set_hidden(parent, bool(j.get("hidden", True)))
        self.store.remove(child)
        unlink_durable(self.journal_path)

    # --- a run ----------------------------------------------------------------------

    def run(self) -> Report:
        start = time.monotonic()
        rep = Report(started=timestamps.now())
        try:
            self.resume(rep)
            self._collect(rep)
        except Error as e:
            rep.errors.append(str(e))
            log.warning("gc of SR %s: %s", self.eng.sr, e)
            raise
        finally:
            rep.finished = timestamps.now()
            rep.seconds = round(time.monotonic() - start, 3)
            with contextlib.suppress(OSError):
                atomic_write_json(self.last_path, rep.to_dict())
            log.info("gc of SR %s: %s", self.eng.sr, rep.summary())
        return rep

    def last(self) -> dict[str, Any] | None:
        with contextlib.suppress(Error):
            doc = read_json(self.last_path)
            return doc if isinstance(doc, dict) else None
        return None

    def _load(self, rep: Report) -> tuple[dict[str, Node], Any] | None:
        recs, bad = self.meta.all()
        if bad:
            rep.skipped.append(
                "unreadable VDI records, nothing deleted: " + "; ".join(bad)
            )
            return None
        try:
            tree: dict[str, Node] = self.store.tree(strict=True)
        except Error as e:
            rep.skipped.append(f"a volume is unreadable, nothing deleted: {e}")
            return None
        return tree, recs

    def _collect(self, rep: Report) -> None:
        rep.cleaned += [f"temp file x{n}" for n in [self.meta.cleanup_temp()] if n]
        rep.cleaned += self.store.cleanup_partial()
        active = set(self.eng.dps.active_vdis())
        loaded = None
        for _ in range(10000):
            if loaded is None:
                loaded = self._load(rep)
                if loaded is None:
                    return
            tree, recs = loaded
            leaves = {r.volume: r for r in recs}
            bases = {r.epoch_base: r for r in recs if r.epoch_base}
            children: dict[str, list[str]] = {}
            for v, n in tree.items():
                if n.parent is not None:
                    children.setdefault(n.parent, []).append(v)
            gone = self._delete_unneeded(tree, leaves, bases, children, rep)
            if gone:
                for v in gone:
                    tree.pop(v, None)
                continue  # the tree in memory is still right: no reload
            users = _users(tree, recs)
            self._fix_hidden(tree, leaves, children, users, active, rep)
            if not self._coalesce_one(
                tree, leaves, bases, children, users, active, rep
            ):
                return
            loaded = None  # a coalesce renames, re-links, re-points: reload

    def _delete_unneeded(
        self,
        tree: dict[str, Node],
        leaves: dict,
        bases: dict,
        children: dict,
        rep: Report,
    ) -> list[str]:
        gone = []
        for v in sorted(tree):
            if v in leaves or v in bases or children.get(v):
                continue
            self.store.remove(v)
            rep.deleted.append(v)
            gone.append(v)
        return gone

    def _fix_hidden(
        self,
        tree: dict[str, Node],
        leaves: dict,
        children: dict,
        users: dict[str, set[str]],
        active: set[str],
        rep: Report,
    ) -> None:
        for v, n in sorted(tree.items()):
            want = None
            if children.get(v) and v not in leaves and not n.hidden:
                want = True
            elif v in leaves and not children.get(v) and n.hidden:
                want = False
            if want is None:
                continue
            if users.get(v, set()) & active:
                rep.skipped.append(
                    f"volume {v}: hidden flag left as is, its chain is in use"
                )
                continue
            self.store.set_hidden(v, want)
            tree[v] = dataclasses.replace(n, hidden=want)
            (rep.hidden if want else rep.unhidden).append(v)

    def _coalesce_one(
        self,
        tree: dict[str, Node],
        leaves: dict,
        bases: dict,
        children: dict,
        users: dict[str, set[str]],
        active: set[str],
        rep: Report,
    ) -> bool:
        """Coalesce one eligible pair; True if the tree changed."""
        for p, n in sorted(tree.items()):
            kids = children.get(p, [])
            if not n.hidden or p in leaves or p in bases or len(kids) != 1:
                continue
            c = kids[0]
            note = f"coalesce of {c} into {p}"
            if any(note in s for s in rep.skipped):
                continue
            vdis = sorted(users.get(p, set()))
            if set(vdis) & active:
                rep.skipped.append(
                    f"{note}: chain in use by {', '.join(sorted(set(vdis) & active))}"
                )
                continue
            try:
                with contextlib.ExitStack() as stack:
                    for vdi in vdis:
                        stack.enter_context(self.eng.vdi_lock(vdi, LOCK_TRY))
                    now_active = set(self.eng.dps.active_vdis()) & set(vdis)
                    if now_active:
                        rep.skipped.append(
                            f"{note}: chain in use by {', '.join(sorted(now_active))}"
                        )
                        continue
                    self._coalesce(p, c, c in leaves, tree, children, rep)
            except LockTimeout:
                rep.skipped.append(f"{note}: a VDI of the chain is busy")
                continue
            return True
        return False

    def _coalesce(
        self,
        p: str,
        c: str,
        leaf: bool,
        tree: dict[str, Node],
        children: dict,
        rep: Report,
    ) -> None:
        j = {
            "op": "coalesce",
            "leaf": leaf and not children.get(c),
            "step": "copy",
            "parent": p,
            "child": c,
            "grandchildren": sorted(children.get(c, [])),
            "hidden": tree[c].hidden,
            "started": timestamps.now(),
        }
        atomic_write_json(self.journal_path, j)
        rep.bytes_coalesced += self.store.coalesce(c)
        j["step"] = "switch"
        atomic_write_json(self.journal_path, j)
        self._switch(j)
        rep.coalesced.append(f"{c} into {p}")


def _users(tree: dict[str, Node], recs: list[Any]) -> dict[str, set[str]]:
    """volume -> the VDIs whose chain (from leaf or epoch base) holds it."""
    out: dict[str, set[str]] = {}
    for r in recs:
        for start in (r.volume, r.epoch_base):
            v = start
            seen = 0
            while v is not None and seen < 10000:
                out.setdefault(v, set()).add(r.vdi)
                node = tree.get(v)
                v = node.parent if node else None
                seen += 1
    return out


def pending_for(engine: SrEngine, volume: str) -> dict[str, Any] | None:
    """The pending journal if it names ``volume`` (VDI.attach must wait)."""
    try:
        doc = read_json(engine.meta.gc_file)
    except Error:
        return None
    if isinstance(doc, dict) and volume in (doc.get("parent"), doc.get("child")):
        return doc
    return None
