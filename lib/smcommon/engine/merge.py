"""One merge of the collector: a hidden parent P takes in its only child C.

This module owns the merge journal ``<sr dir>/.sm/gc.json`` and the three
steps of a merge (the reasons each is safe are in docs/design.md):

1. ``copy`` (no SR lock): C's sectors are copied into P
   (``store.coalesce``); every reader of P reads it through C, so none
   reads a sector being written.  Repeatable: C does not change (an
   interior C is a frozen hidden volume; a leaf C is watched, below).
2. ``copied``: the copy is complete; waiting for the SR lock.
3. ``switch`` (under the SR lock and the VDI locks of the chain's users,
   after re-checking that the tree did not change): P takes C's place.

   - *interior* (C hidden, with children): each child of C is re-linked to P
     (``store.set_parent``; the leaf of a running VM is re-linked without
     its image lock), an epoch base C is re-pointed to P, C is deleted;
   - *leaf* (C is a VDI's leaf, no children, no datapath): P is renamed
     over C (the VDI keeps its leaf name) and un-hidden.

   Every action of the switch is idempotent; a switch killed midway is
   finished by the next holder of the SR lock (``finish_switch``).

A leaf merge is abandoned (P keeps the extra sectors, which only C's readers
could see, and C shadows them) when the VDI is attached during the copy:
VDI.attach writes ``.sm/gc-cancel-<C>`` (``cancel_for``), the copy stops at
the next batch, and the switch re-checks the datapaths and C's stamp
(inode, size, mtime, ctime).
"""

from __future__ import annotations

import contextlib
import logging
import os

from smcommon.engine.meta import read_json
from smcommon.errors import Error
from smcommon.fileio import atomic_write_json, unlink_durable
from smcommon.record import asdict, field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from smcommon.engine.meta import VdiRecord
    from smcommon.engine.sr import SrEngine
    from smcommon.engine.store import Node

log = logging.getLogger(__name__)

CANCEL_PREFIX = "gc-cancel-"


@record
class Plan:
    """The journal of the merge in progress."""

    kind: str  # "interior" | "leaf"
    parent: str
    child: str
    step: str = "copy"  # "copy" -> "copied" -> "switch"
    vdi: str = ""  # leaf: the VDI whose leaf C is
    stamp: list[int] = field(default_factory=list)  # leaf: C's stamp when planned
    hidden: bool = True  # C's hidden flag (P gets it)
    started: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"op": "merge", **asdict(self)}

    @classmethod
    def from_json(cls, doc: Any) -> Plan | None:
        if not isinstance(doc, dict):
            return None
        try:
            if doc.get("op") == "coalesce":  # the journal of an earlier version
                return cls(
                    kind="leaf" if doc.get("leaf") else "interior",
                    parent=str(doc["parent"]),
                    child=str(doc["child"]),
                    step="switch" if doc.get("step") == "switch" else "copy",
                    hidden=bool(doc.get("hidden", True)),
                )
            return cls(
                kind=str(doc["kind"]),
                parent=str(doc["parent"]),
                child=str(doc["child"]),
                step=str(doc.get("step", "copy")),
                vdi=str(doc.get("vdi", "")),
                stamp=[int(x) for x in doc.get("stamp", [])],
                hidden=bool(doc.get("hidden", True)),
                started=str(doc.get("started", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        return f"{self.kind} merge of {self.child} into {self.parent}"


class Stopped(Exception):
    """The collector was asked to stop (SR.detach): the journal stays."""


class Cancelled(Exception):
    """The leaf being merged was attached: the merge is abandoned."""


def journal(eng: SrEngine) -> Plan | None:
    try:
        return Plan.from_json(read_json(eng.meta.gc_file))
    except Error:
        return None


def save(eng: SrEngine, plan: Plan) -> None:
    atomic_write_json(eng.meta.gc_file, plan.to_json())


def drop(eng: SrEngine, plan: Plan | None = None) -> None:
    unlink_durable(eng.meta.gc_file)
    if plan is not None:
        clear_cancel(eng, plan.child)


def cancel_path(eng: SrEngine, volume: str) -> str:
    return str(eng.meta.sm_dir / (CANCEL_PREFIX + volume))


def cancel_for(eng: SrEngine, volume: str) -> bool:
    """VDI.attach of a VDI whose leaf a pending leaf merge copies: ask the
    collector to abandon it (under the VDI lock).  True if one was pending."""
    plan = journal(eng)
    if plan is None or plan.kind != "leaf" or plan.child != volume:
        return False
    if plan.step == "switch":
        return True  # the caller finishes it under the SR lock
    fd = os.open(
        cancel_path(eng, volume), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644
    )
    os.close(fd)
    log.info(
        "VDI.attach of volume %s: the collector's merge of it is abandoned", volume
    )
    return True


def cancelled(eng: SrEngine, volume: str) -> bool:
    return os.path.exists(cancel_path(eng, volume))


def clear_cancel(eng: SrEngine, volume: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cancel_path(eng, volume))


# --- the steps ----------------------------------------------------------------


def copy(eng: SrEngine, plan: Plan, progress: Any) -> int:
    """Step 1, without the SR lock: C's sectors into P.  ``progress(done,
    total)`` may raise Stopped; a cancelled leaf merge raises Cancelled."""

    def on_batch(done: int, total: int) -> None:
        if plan.kind == "leaf" and cancelled(eng, plan.child):
            raise Cancelled(plan.child)
        progress(done, total)

    if plan.kind == "leaf" and cancelled(eng, plan.child):
        raise Cancelled(plan.child)
    n = eng.store.coalesce(plan.child, on_batch)
    plan.step = "copied"
    save(eng, plan)
    return n


def still_valid(
    eng: SrEngine, plan: Plan, tree: dict[str, Node], recs: list[VdiRecord]
) -> str:
    """Under the SR lock (and the VDI locks of the users): why the switch may
    no longer be done ("" = it may)."""
    p, c = plan.parent, plan.child
    if p not in tree or c not in tree:
        return "a volume of the merge is gone"
    if tree[c].parent != p:
        return f"{c} is no longer a child of {p}"
    kids_of_p = [v for v, n in tree.items() if n.parent == p]
    if kids_of_p != [c]:
        return f"{p} has other children now: {sorted(kids_of_p)}"
    owned = eng.owned.owned()
    if p not in owned or c not in owned:
        return "a volume of the merge is not the SR's own"
    leaves = {r.volume: r for r in recs}
    if p in leaves or any(r.epoch_base == p for r in recs):
        return f"{p} is a VDI's leaf or epoch base now"
    kids_of_c = [v for v, n in tree.items() if n.parent == c]
    if plan.kind == "interior":
        if c in leaves:
            return f"{c} is a VDI's leaf now"
        foreign = [k for k in kids_of_c if k not in owned]
        if foreign:
            return f"{c} has children the SR did not make: {foreign}"
        return ""
    rec = leaves.get(c)
    if rec is None or rec.vdi != plan.vdi:
        return f"{c} is no longer the leaf of VDI {plan.vdi}"
    if kids_of_c:
        return f"{c} has children now"
    if eng.dps.states(rec.vdi):
        return f"VDI {rec.vdi} was attached meanwhile"
    if cancelled(eng, c):
        return f"VDI {rec.vdi} was attached meanwhile"
    if eng.store.stamp(c) != plan.stamp:
        return f"{c} was written meanwhile"
    if eng.store.busy(c):
        return f"{c} is held by a writer"
    return ""


def switch(eng: SrEngine, plan: Plan) -> list[str]:
    """Step 3 (idempotent), under the SR lock: P takes C's place.  Returns
    the children that could not be re-linked (they stay on C, which is then
    kept: every chain still reads the same)."""
    store = eng.store
    p, c = plan.parent, plan.child
    if plan.step != "switch":
        plan.step = "switch"
        save(eng, plan)
    if plan.kind == "leaf":
        if store.exists(p):
            store.replace(p, c)
        if store.exists(c):
            store.set_hidden(c, False)
        eng.owned.forget(p)
        drop(eng, plan)
        return []
    tree = store.tree()
    failed = []
    for g, n in sorted(tree.items()):
        if n.parent == c and store.exists(p):
            try:
                store.set_parent(g, p, live_ok=True)
            except Error as e:  # e.g. no room for its locators without moving blocks
                failed.append(f"{g} stays on {c}: {e}")
    for rec in eng.meta.records():
        if rec.epoch_base == c and not failed:
            rec.epoch_base = p
            eng.meta.put(rec)
    if store.exists(p):
        node = tree.get(p)
        if node is None or node.hidden != plan.hidden:
            store.set_hidden(p, plan.hidden)
    if not failed:
        try:
            store.remove(c)
            eng.owned.forget(c)
        except Error as e:
            # a store that cannot remove a volume a running VM still has open
            # (LVStore: its device maps the LV's extents) keeps it, owned and
            # unneeded: a later pass deletes it once the VM let go
            failed.append(f"{c} is kept for now: {e}")
    drop(eng, plan)
    return failed


def finish_switch(eng: SrEngine) -> None:
    """A switch a killed process left half done (callers hold the SR lock)."""
    plan = journal(eng)
    if plan is None:
        if eng.meta.gc_file.exists():  # unreadable: nothing can be resumed
            unlink_durable(eng.meta.gc_file)
        return
    if plan.step == "switch":
        log.warning("finishing the interrupted switch of the %s", plan.describe())
        switch(eng, plan)


def pending_for(eng: SrEngine, volume: str) -> Plan | None:
    """The pending merge naming ``volume``, if any."""
    plan = journal(eng)
    if plan is not None and volume in (plan.parent, plan.child):
        return plan
    return None
