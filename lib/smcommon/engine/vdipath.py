"""Datapath operations of VDIs: VDI.attach/activate/deactivate/detach.

The automaton and its on-disk state belong to ``smcommon.engine.datapath``
(``Datapaths``); this module drives it.  Each call holds the VDI's lock around
plan -> backend change (only when the VDI's *effective* state changes) ->
commit, so a crash between the backend change and the commit leaves the old
recorded state and the next call redoes the change (store activation is
idempotent).

Effective state -> backend (``VolumeStore``): reaching Activated (or
Activated(RW) from Activated(RO)) activates the leaf's chain on this host;
leaving Activated deactivates it.  Attach levels need nothing from a file
store beyond the leaf existing.

attach returns ``attach_info``: ``params`` is the absolute path of the leaf
VHD a VM backend (tapdisk) would open; ``xenstore_data`` carries the keys a
backend uses to find its VDI again.
"""

from __future__ import annotations

import logging

from smcommon.errors import BackendError, InvalidRequest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from smcommon.engine.datapath import DpState, Transition
    from smcommon.engine.meta import VdiRecord
    from smcommon.engine.sr import SrEngine

log = logging.getLogger(__name__)


def attach_info(eng: SrEngine, rec: VdiRecord, read_write: bool) -> dict[str, Any]:
    return {
        "params": eng.store.path(rec.volume),
        "xenstore_data": {
            "sr-uuid": eng.sr,
            "vdi-uuid": rec.vdi,
            "vdi-type": "vhd",
            "mode": "w" if read_write else "r",
            "virtual-size": str(rec.virtual_size),
            "params": eng.store.path(rec.volume),
        },
    }


def _apply(eng: SrEngine, rec: VdiRecord, t: Transition) -> None:
    """Bring the backend from t.old_effective to t.new_effective."""
    old: DpState = t.old_effective
    new: DpState = t.new_effective
    # a store whose volumes need a device (LVStore) makes it at attach: grown
    # first for a writer, then the chain active until detach
    attach_volume = getattr(eng.store, "attach_volume", None)
    if attach_volume is not None and new.attached and (
        not old.attached or (new.read_write and not old.read_write)
    ):
        attach_volume(rec.volume, new.read_write)
    if new.activated and (not old.activated or (new.read_write and not old.read_write)):
        eng.store.activate(rec.volume, new.read_write)
    elif old.activated and not new.activated:
        eng.store.deactivate(rec.volume)
    elif new.attached and not old.attached and not eng.store.exists(rec.volume):
        raise BackendError(
            "VHD_MISSING", [f"leaf volume {rec.volume} of VDI {rec.vdi} is missing"]
        )
    detach_volume = getattr(eng.store, "detach_volume", None)
    if detach_volume is not None and old.attached and not new.attached:
        detach_volume(rec.volume)


def change(
    eng: SrEngine, vdi: str, dp: str, op: str, read_write: bool | None = None
) -> Transition:
    """One datapath operation under the VDI lock; returns the transition made."""
    from smcommon.engine import merge

    rec = eng.get(vdi)
    plan = merge.journal(eng) if op == "attach" else None
    needs_recovery = getattr(eng.store, "needs_recovery", None)
    if (plan is not None and plan.step == "switch") or (
        needs_recovery is not None and needs_recovery()
    ):
        # a switch a killed collector left may have re-linked some images of
        # this chain and not others; a killed call of a store (LVStore) may
        # have left a half-done step: both are finished before any open
        with eng.tree_lock():
            pass
    with eng.vdi_lock(rec.vdi):
        eng.check_attached()
        rec = eng.get(vdi)
        if op == "attach":
            if not isinstance(read_write, bool):
                raise InvalidRequest("read_write must be a boolean")
            if read_write and rec.read_only:
                raise BackendError(
                    "VDI_READ_ONLY",
                    [f"VDI {rec.vdi} is read-only: attach it read-only"],
                )
            # a leaf merge copying this leaf is abandoned (the collector stops
            # at its next batch); a switch is finished first (above)
            merge.cancel_for(eng, rec.volume)
            plan = merge.pending_for(eng, rec.volume)
            if plan is not None and plan.step == "switch":
                raise BackendError(
                    "GC_IN_PROGRESS",
                    [f"the {plan.describe()} must finish first: run SR.gc, then retry"],
                )
        t = eng.dps.plan(rec.vdi, dp, op, read_write)
        if t.effective_changed:
            _apply(eng, rec, t)
        eng.dps.commit(t)
    if t.old is not t.new:
        log.info(
            "VDI %s dp %s: %s -> %s (effective %s -> %s)",
            rec.vdi,
            dp,
            t.old.value,
            t.new.value,
            t.old_effective.value,
            t.new_effective.value,
        )
    return t


def attach(eng: SrEngine, dp: str, vdi: str, read_write: bool) -> dict[str, Any]:
    change(eng, vdi, dp, "attach", read_write)
    rec = eng.get(vdi)
    return attach_info(eng, rec, eng.dps.effective(rec.vdi).read_write or read_write)


def activate(eng: SrEngine, dp: str, vdi: str) -> None:
    change(eng, vdi, dp, "activate")


def deactivate(eng: SrEngine, dp: str, vdi: str) -> None:
    change(eng, vdi, dp, "deactivate")


def detach(eng: SrEngine, dp: str, vdi: str) -> None:
    change(eng, vdi, dp, "detach")


def release_all(eng: SrEngine) -> list[str]:
    """Deactivate and detach every datapath of the SR (SR.detach/destroy)."""
    done = []
    for vdi in eng.dps.active_vdis():
        if not eng.meta.exists(vdi):
            eng.dps.forget(vdi)  # a VDI gone from the SR: nothing to release
            continue
        for dp in sorted(eng.dps.states(vdi)):
            change(eng, vdi, dp, "deactivate")
            change(eng, vdi, dp, "detach")
            done.append(f"{vdi}/{dp}")
    return done
