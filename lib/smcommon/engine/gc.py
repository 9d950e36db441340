"""The garbage collector of an SR's VHD tree: one pass, journaled, restartable.

A pass (``Collector.run``) repeats, until nothing is left to do:

A. under the SR lock (short): finish a merge switch a killed process left;
   remove temp files of killed processes; delete volumes nobody needs (owned,
   no children, and no VDI record names them as its leaf or epoch base);
   hide unreferenced volumes that have children (a snapshot killed before its
   last step) and un-hide VDI leaves; then pick one merge and journal it;
B. without the SR lock: copy the merge (``merge.copy``), however long;
C. under the SR lock and the VDI locks of the chain's users (short): check
   the tree did not change, then switch (``merge.switch``).

Only volumes the SR made (``smcommon.engine.owned``) are ever deleted,
re-linked, renamed or rewritten, and a volume any file has as its parent
(foreign files too) is never deleted.  Nothing is deleted when a VDI record
or an owned volume's header cannot be read (the tree would be incomplete).

Merges: a hidden, owned parent P with a single child C, itself owned:
*interior* when C is a hidden volume with children (allowed on the chain of
a running VM: see docs/design.md, "Chains of running VMs"); *leaf* when C is
the leaf of a VDI that has no datapath and no writer.  An epoch base is
never merged into.  Hidden flags on chains in use are left alone (a backend
rewrites the footer of the image it writes).

Who runs a pass: the SR's collector process (``smcommon.engine.collector``)
after destroy, compose and set_persistent; ``SR.gc`` in the foreground.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator

from smcommon import timestamps
from smcommon.engine import merge
from smcommon.engine.merge import Cancelled, Plan, Stopped
from smcommon.engine.meta import read_json
from smcommon.errors import Error, LockTimeout
from smcommon.fileio import atomic_write_json
from smcommon.record import asdict, field, record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from smcommon.engine.meta import VdiRecord
    from smcommon.engine.sr import SrEngine
    from smcommon.engine.store import Node

log = logging.getLogger(__name__)

LOCK_TRY = 1.0  # seconds the collector waits for a VDI lock before skipping
SR_LOCK_TRY = 1.0  # seconds per wait for the SR lock (the stop flag is checked between)
SR_LOCK_WAIT = 60.0  # seconds the collector process waits for the SR lock in all
SWITCH_TRIES = 6  # waits for the locks of a switch before leaving it for the next pass
MAX_ROUNDS = 10000


@record
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
    stopped: bool = False

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
        if self.stopped:
            parts.append("stopped")
        return ", ".join(parts)


class Progress:
    """Where a pass reports what it does (the collector process writes it to
    the SR for Query.diagnostics); this base reports nowhere."""

    def step(self, text: str) -> None:
        pass

    def copied(self, done: int, total: int) -> None:
        pass


class Collector:
    """One pass of the collector of one SR.  Takes the SR lock as it needs it
    (a caller may hold it already: it is re-entrant, and then the copy runs
    under it too), waiting up to ``lock_wait`` seconds for it: the collector
    process waits long (SR_LOCK_WAIT); SR.gc as long as any call
    (``$SM_LOCK_TIMEOUT``)."""

    def __init__(
        self,
        engine: SrEngine,
        should_stop: Callable[[], bool] | None = None,
        progress: Progress | None = None,
        lock_wait: float = 0.0,
    ) -> None:
        self.eng = engine
        self.meta = engine.meta
        self.store = engine.store
        self.journal_path = engine.meta.gc_file
        self.last_path = engine.meta.sm_dir / "gc-last.json"
        self.should_stop = should_stop or (lambda: False)
        self.progress = progress or Progress()
        self._failed: set[str] = set()
        self.lock_tries = max(1, math.ceil((lock_wait or SR_LOCK_WAIT) / SR_LOCK_TRY))

    # --- a pass --------------------------------------------------------------------

    def run(self) -> Report:
        start = time.monotonic()
        rep = Report(started=timestamps.now())
        tried = self._failed
        try:
            for _ in range(MAX_ROUNDS):
                self._check_stop()
                plan = self._plan(rep, tried)
                if plan is None:
                    break
                if plan.step == "copy" and not self._copy(plan, rep):
                    continue
                if not self._switch(plan, rep):
                    break
        except Stopped:
            rep.stopped = True
            log.info("gc of SR %s stopped on request", self.eng.sr)
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

    def _check_stop(self) -> None:
        if self.should_stop():
            raise Stopped()

    @contextlib.contextmanager
    def _sr_lock(self, tries: int = 0) -> Iterator[None]:
        """The SR lock, waited for in slices so a stop request is seen."""
        tries = tries or self.lock_tries
        held = contextlib.ExitStack()
        for _ in range(tries):
            self._check_stop()
            try:
                held.enter_context(self.eng.tree_lock(timeout=SR_LOCK_TRY))
                break
            except LockTimeout:
                continue
        else:
            raise LockTimeout(f"sr/{self.eng.sr}", SR_LOCK_TRY * tries)
        with held:
            yield

    # --- A: under the SR lock: delete, hide, plan --------------------------------

    def _plan(self, rep: Report, tried: set[str]) -> Plan | None:
        self.progress.step("looking for garbage")
        with self._sr_lock():
            plan = merge.journal(self.eng)
            if plan is not None:
                rep.resumed = rep.resumed or f"{plan.describe()} at step {plan.step}"
                return plan
            owned = self.eng.owned.owned()
            rep.cleaned += [f"temp file x{n}" for n in [self.meta.cleanup_temp()] if n]
            rep.cleaned += self.store.cleanup_partial(owned)
            loaded = None
            for _ in range(MAX_ROUNDS):
                if loaded is None:
                    loaded = self._load(rep)
                    if loaded is None:
                        return None
                tree, recs = loaded
                owned = self.eng.owned.owned() | self.eng.needed_from(tree, recs)
                gone = self._delete_unneeded(tree, recs, owned, rep)
                if gone:
                    for v in gone:
                        tree.pop(v, None)
                    continue  # the tree in memory is still right: no reload
                active = set(self.eng.dps.active_vdis())
                users = _users(tree, recs)
                self._fix_hidden(tree, recs, owned, users, active, rep)
                return self._choose(tree, recs, owned, users, active, rep, tried)
        return None

    def _load(self, rep: Report) -> tuple[dict[str, Node], list[VdiRecord]] | None:
        recs, bad = self.meta.all()
        if bad:
            rep.skipped.append(
                "unreadable VDI records, nothing deleted: " + "; ".join(bad)
            )
            return None
        tree: dict[str, Node] = self.store.tree()
        owned = self.eng.owned.owned() | self.eng.needed_from(tree, recs)
        missing = sorted(
            v for v in self.store.volumes() if v in owned and v not in tree
        )
        if missing:
            rep.skipped.append(
                f"volumes of the SR are unreadable, nothing deleted: {missing}"
            )
            return None
        self.eng.owned.prune(self.store.volumes())
        return tree, recs

    def _delete_unneeded(
        self,
        tree: dict[str, Node],
        recs: list[VdiRecord],
        owned: set[str],
        rep: Report,
    ) -> list[str]:
        needed = {r.volume for r in recs} | {r.epoch_base for r in recs if r.epoch_base}
        parents = {n.parent for n in tree.values() if n.parent is not None}
        gone = []
        for v in sorted(tree):
            if v not in owned or v in needed or v in parents:
                continue
            try:
                self.store.remove(v)
            except Error as e:  # in use on this host (LVStore): the next pass
                rep.skipped.append(f"{v} not deleted yet: {e}")
                continue
            self.eng.owned.forget(v)
            rep.deleted.append(v)
            gone.append(v)
        return gone

    def _fix_hidden(
        self,
        tree: dict[str, Node],
        recs: list[VdiRecord],
        owned: set[str],
        users: dict[str, set[str]],
        active: set[str],
        rep: Report,
    ) -> None:
        leaves = {r.volume for r in recs}
        parents = {n.parent for n in tree.values() if n.parent is not None}
        for v, n in sorted(tree.items()):
            if v not in owned:
                continue
            want = None
            if v in parents and v not in leaves and not n.hidden:
                want = True
            elif v in leaves and v not in parents and n.hidden:
                want = False
            if want is None:
                continue
            if users.get(v, set()) & active:
                rep.skipped.append(
                    f"volume {v}: hidden flag left as is, its chain is in use"
                )
                continue
            self.store.set_hidden(v, want)
            tree[v] = replace(n, hidden=want)
            (rep.hidden if want else rep.unhidden).append(v)

    def _choose(
        self,
        tree: dict[str, Node],
        recs: list[VdiRecord],
        owned: set[str],
        users: dict[str, set[str]],
        active: set[str],
        rep: Report,
        tried: set[str],
    ) -> Plan | None:
        """Journal one merge (interior merges first: they shorten the chains
        of running VMs too)."""
        leaves = {r.volume: r for r in recs}
        bases = {r.epoch_base for r in recs if r.epoch_base}
        children: dict[str, list[str]] = {}
        for v, n in tree.items():
            if n.parent is not None:
                children.setdefault(n.parent, []).append(v)
        candidates = []
        for p, n in sorted(tree.items()):
            kids = children.get(p, [])
            if p not in owned or not n.hidden or p in leaves or p in bases:
                continue
            if len(kids) != 1 or kids[0] not in owned:
                continue
            c = kids[0]
            interior = bool(children.get(c))
            if not interior and c not in leaves:
                continue
            candidates.append((0 if interior else 1, p, c))
        for _, p, c in sorted(candidates):
            note = f"merge of {c} into {p}"
            if note in tried:
                continue
            tried.add(note)
            in_use = sorted(users.get(p, set()) & active)
            if children.get(c):
                foreign = [k for k in children[c] if k not in owned]
                if c in leaves or foreign:
                    rep.skipped.append(f"{note}: {c} has children the SR did not make")
                    continue
                if in_use and tree[p].virtual_size < tree[c].virtual_size:
                    rep.skipped.append(f"{note}: chain in use by {', '.join(in_use)}")
                    continue
                plan = Plan(
                    "interior", p, c, hidden=tree[c].hidden, started=timestamps.now()
                )
                merge.save(self.eng, plan)
                return plan
            leaf_plan = self._plan_leaf(p, c, leaves[c], in_use, rep, note)
            if leaf_plan is not None:
                return leaf_plan
        return None

    def _plan_leaf(
        self, p: str, c: str, rec: VdiRecord, in_use: list[str], rep: Report, note: str
    ) -> Plan | None:
        if in_use:
            rep.skipped.append(f"{note}: chain in use by {', '.join(in_use)}")
            return None
        try:
            # under the VDI lock: an attach after this sees the journal and
            # cancels the merge (merge.cancel_for)
            with self.eng.vdi_lock(rec.vdi, LOCK_TRY):
                if self.eng.dps.states(rec.vdi):
                    rep.skipped.append(f"{note}: chain in use by {rec.vdi}")
                    return None
                if self.store.busy(c):
                    rep.skipped.append(f"{note}: {c} is held by a writer")
                    return None
                merge.clear_cancel(self.eng, c)
                plan = Plan(
                    "leaf",
                    p,
                    c,
                    vdi=rec.vdi,
                    stamp=self.store.stamp(c) or [],
                    hidden=False,
                    started=timestamps.now(),
                )
                merge.save(self.eng, plan)
                return plan
        except LockTimeout:
            rep.skipped.append(f"{note}: VDI {rec.vdi} is busy")
            return None

    # --- B: the copy, without the SR lock -------------------------------------------

    def _copy(self, plan: Plan, rep: Report) -> bool:
        """False if the merge was abandoned (the leaf was attached)."""
        self.progress.step(f"copying: {plan.describe()}")
        started = time.monotonic()

        def on_batch(done: int, total: int) -> None:
            self.progress.copied(done, total)
            self._check_stop()

        try:
            n = merge.copy(self.eng, plan, on_batch)
        except Cancelled:
            merge.drop(self.eng, plan)
            rep.skipped.append(f"{plan.describe()}: abandoned, the VDI was attached")
            return False
        except Error as e:
            # P holds some of C's sectors, which only C's readers could see
            # (and C shadows them): dropping the journal loses nothing
            merge.drop(self.eng, plan)
            self._failed.add(f"merge of {plan.child} into {plan.parent}")
            rep.errors.append(f"{plan.describe()}: {e}")
            log.warning("gc of SR %s: %s failed: %s", self.eng.sr, plan.describe(), e)
            return False
        rep.bytes_coalesced += n
        log.info(
            "gc of SR %s: copied %d bytes for the %s in %.3fs",
            self.eng.sr,
            n,
            plan.describe(),
            time.monotonic() - started,
        )
        return True

    # --- C: the switch, under the locks ----------------------------------------------

    def _switch(self, plan: Plan, rep: Report) -> bool:
        """False if the locks stayed busy (the journal waits for the next pass)."""
        self.progress.step(f"re-linking: {plan.describe()}")
        for attempt in range(SWITCH_TRIES):
            self._check_stop()
            try:
                with self._sr_lock(tries=1):
                    if merge.journal(self.eng) is None:
                        return True  # finished by another lock holder
                    recs, bad = self.meta.all()
                    if bad:
                        rep.skipped.append(
                            f"{plan.describe()}: unreadable VDI records, not switched"
                        )
                        return False
                    tree = self.store.tree()
                    vdis = sorted(_users(tree, recs).get(plan.child, set()))
                    with contextlib.ExitStack() as held:
                        for vdi in vdis:
                            held.enter_context(self.eng.vdi_lock(vdi, LOCK_TRY))
                        why = merge.still_valid(self.eng, plan, tree, recs)
                        if why:
                            merge.drop(self.eng, plan)
                            rep.skipped.append(f"{plan.describe()}: abandoned, {why}")
                            return True
                        failed = merge.switch(self.eng, plan)
                    if failed:
                        rep.errors += [f"{plan.describe()}: {f}" for f in failed]
                    else:
                        rep.coalesced.append(f"{plan.child} into {plan.parent}")
                    return True
            except LockTimeout:
                time.sleep(min(0.2 * 2**attempt, 2.0))
        rep.skipped.append(f"{plan.describe()}: locks busy, left for the next pass")
        return False


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
    """The pending journal if it names ``volume`` (kept for callers of the
    earlier API)."""
    plan = merge.pending_for(engine, volume)
    return plan.to_json() if plan is not None else None
