"""Datapath states of VDIs: the reference toolstack's automaton, kept on disk.

This module owns the per-(VDI, dp) state machine and its persistence; it
never touches a backend.  A datapath (``dp``) is one user of a VDI (one VM's
disk connection).  Each datapath moves through::

    Detached --attach(ro|rw)--> Attached(RO|RW) --activate--> Activated(RO|RW)
    Detached <--detach--------- Attached(RO|RW) <-deactivate- Activated(RO|RW)

The rules (``Datapaths.plan``):

* repeating the current state is a no-op: attach with the same mode, activate
  when activated, deactivate when attached or detached, detach when detached;
* attach RW over RO upgrades (Attached(RO) -> Attached(RW),
  Activated(RO) -> Activated(RW)); attach RO over RW is refused with
  ``Backend_error(DATAPATH_RO_OVER_RW)``: the caller asked for less than the
  datapath already has, which would silently keep a writable disk;
* Detached + activate and Activated + detach are ``Illegal_transition``
  (activate needs an attach first; a detach needs a deactivate first).
  The to-state named for Detached + activate is ``Activated(RO)``: the mode is
  unknown without an attach, and RO is the lesser claim.

A VDI's *effective* state is what the backend must provide for all of its
datapaths together.  It keeps both dimensions: the highest level reached by
any datapath (detached < attached < activated) and whether any datapath is
read-write.  So Activated(RO) on one dp and Attached(RW) on another give
Activated(RW): the backend must be active *and* writable.  That is the same
"superstate" the reference toolstack computes, and it equals the plain
maximum under the order Detached < Attached(RO) < Attached(RW) <
Activated(RO) < Activated(RW) whenever the datapaths agree on the mode.

Persistence: one small JSON file per VDI with at least one non-Detached
datapath, ``<state_dir>/<vdi>.json``, written atomically (temp file, fsync,
rename, fsync of the directory); the last datapath going Detached removes
the file.  A crash at any instant leaves either the old or the new file.

Locking is the caller's: it holds the per-VDI lock around
``plan`` -> backend change (only if ``effective_changed``) -> ``commit``.  A
crash between the backend change and ``commit`` leaves the old recorded
state; the next call plans the same change again and the backend redoes it
idempotently.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from pathlib import Path

from smcommon.errors import BackendError, IllegalTransition, InvalidRequest
from smcommon.fileio import atomic_write, fsync_dir
from smcommon.paths import safe_name
from smcommon.record import record

OPS = ("attach", "activate", "deactivate", "detach")
MAX_DP = 1024
_SUFFIX = ".json"
_FORMAT = 1


class DpState(str, enum.Enum):
    """A datapath's state; ordered Detached < Attached(RO) < Attached(RW) <
    Activated(RO) < Activated(RW)."""

    DETACHED = "Detached"
    ATTACHED_RO = "Attached(RO)"
    ATTACHED_RW = "Attached(RW)"
    ACTIVATED_RO = "Activated(RO)"
    ACTIVATED_RW = "Activated(RW)"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def level(self) -> int:
        """0 detached, 1 attached, 2 activated."""
        return (self.rank + 1) // 2

    @property
    def read_write(self) -> bool:
        return self in (DpState.ATTACHED_RW, DpState.ACTIVATED_RW)

    @property
    def attached(self) -> bool:
        return self is not DpState.DETACHED

    @property
    def activated(self) -> bool:
        return self.level == 2

    @classmethod
    def of(cls, level: int, read_write: bool) -> DpState:
        if level <= 0:
            return cls.DETACHED
        if level == 1:
            return cls.ATTACHED_RW if read_write else cls.ATTACHED_RO
        return cls.ACTIVATED_RW if read_write else cls.ACTIVATED_RO

    def __str__(self) -> str:
        return self.value

    # str's lexical order would be wrong: compare by rank.
    def __lt__(self, other: object) -> bool:
        if not isinstance(other, DpState):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, DpState):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, DpState):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, DpState):
            return NotImplemented
        return self.rank >= other.rank

    __hash__ = str.__hash__


_RANK = {s: i for i, s in enumerate(DpState)}


def effective_of(states: list[DpState] | tuple[DpState, ...]) -> DpState:
    """What the backend must provide for all these datapath states together."""
    level = max((s.level for s in states), default=0)
    return DpState.of(level, any(s.read_write for s in states))


@record(frozen=True)
class Transition:
    vdi: str
    dp: str
    old: DpState
    new: DpState
    old_effective: DpState
    new_effective: DpState

    @property
    def effective_changed(self) -> bool:
        return self.old_effective is not self.new_effective

    @property
    def noop(self) -> bool:
        return self.old is self.new


class StateCorrupt(BackendError):
    """A datapath state file that cannot be read (damaged by hand or disk)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__("DATAPATH_STATE_CORRUPT", [str(path), why])


def next_state(old: DpState, op: str, read_write: bool | None = None) -> DpState:
    """The state after ``op`` from ``old``; raises on a forbidden transition."""
    if op == "attach":
        if read_write is None:
            raise InvalidRequest("attach needs read_write (true or false)")
        if old is DpState.DETACHED:
            return DpState.of(1, read_write)
        if old.read_write and not read_write:
            raise BackendError(
                "DATAPATH_RO_OVER_RW",
                [f"datapath is {old.value}: cannot attach it read-only"],
            )
        return DpState.of(old.level, old.read_write or read_write)
    if op == "activate":
        if old is DpState.DETACHED:
            raise IllegalTransition(old.value, DpState.ACTIVATED_RO.value)
        return DpState.of(2, old.read_write)
    if op == "deactivate":
        if old.activated:
            return DpState.of(1, old.read_write)
        return old
    if op == "detach":
        if old.activated:
            raise IllegalTransition(old.value, DpState.DETACHED.value)
        return DpState.DETACHED
    raise InvalidRequest(
        f"unknown datapath operation {op!r} (expected one of {', '.join(OPS)})"
    )


class Datapaths:
    """The datapath states of the VDIs of one SR on this host."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    # --- queries ---------------------------------------------------------

    def states(self, vdi: str) -> dict[str, DpState]:
        """dp -> state of every non-Detached datapath of ``vdi``."""
        return self._load(vdi)

    def effective(self, vdi: str) -> DpState:
        return effective_of(tuple(self._load(vdi).values()))

    def active_vdis(self) -> list[str]:
        """VDIs with any non-Detached datapath, sorted."""
        try:
            names = os.listdir(self.state_dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.startswith(".") or not name.endswith(_SUFFIX):
                continue
            vdi = name[: -len(_SUFFIX)]
            if self._load(vdi):
                out.append(vdi)
        return sorted(out)

    # --- changes ---------------------------------------------------------

    def plan(
        self, vdi: str, dp: str, op: str, read_write: bool | None = None
    ) -> Transition:
        """The transition ``op`` makes for (vdi, dp); pure (writes nothing)."""
        _check_dp(dp)
        states = self._load(vdi)
        old = states.get(dp, DpState.DETACHED)
        new = next_state(old, op, read_write)
        old_eff = effective_of(tuple(states.values()))
        after = dict(states)
        after[dp] = new
        new_eff = effective_of(tuple(after.values()))
        return Transition(vdi, dp, old, new, old_eff, new_eff)

    def commit(self, t: Transition) -> None:
        """Record ``t.new`` for (t.vdi, t.dp) atomically.

        Refuses a stale plan (the recorded state is no longer ``t.old``):
        that means someone changed the datapath without the VDI lock.
        """
        _check_dp(t.dp)
        states = self._load(t.vdi)
        current = states.get(t.dp, DpState.DETACHED)
        if current is not t.old:
            raise BackendError(
                "DATAPATH_STATE_CHANGED",
                [
                    f"datapath {t.dp} of {t.vdi} is {current.value}, planned from {t.old.value}"
                ],
            )
        if t.new is t.old:
            return
        if t.new is DpState.DETACHED:
            states.pop(t.dp, None)
        else:
            states[t.dp] = t.new
        self._store(t.vdi, states)

    def forget(self, vdi: str) -> None:
        """Drop every datapath state of ``vdi`` (SR.reset, VDI/SR destroy)."""
        path = self._path(vdi)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(self.state_dir)

    # --- files -----------------------------------------------------------

    def _path(self, vdi: str) -> Path:
        return self.state_dir / (safe_name("vdi", vdi) + _SUFFIX)

    def _load(self, vdi: str) -> dict[str, DpState]:
        path = self._path(vdi)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StateCorrupt(path, e.strerror or str(e)) from None
        try:
            doc = json.loads(raw)
            dps = doc["dps"]
            if not isinstance(dps, dict):
                raise TypeError("dps is not an object")
            states = {str(dp): DpState(s) for dp, s in dps.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise StateCorrupt(path, f"{type(e).__name__}: {e}") from None
        return {dp: s for dp, s in states.items() if s is not DpState.DETACHED}

    def _store(self, vdi: str, states: dict[str, DpState]) -> None:
        path = self._path(vdi)
        if not states:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                fsync_dir(self.state_dir)
            return
        doc = {
            "format": _FORMAT,
            "vdi": vdi,
            "dps": {dp: s.value for dp, s in sorted(states.items())},
        }
        data = json.dumps(doc, sort_keys=True).encode() + b"\n"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)


def _check_dp(dp: object) -> None:
    # A dp is stored in the file, never used as a path, so any text will do
    # (the toolstack uses names like "vbd/3/xvda"); bound it and forbid NUL.
    if not isinstance(dp, str) or not dp:
        raise InvalidRequest("dp must be a non-empty string")
    if len(dp) > MAX_DP or "\x00" in dp:
        raise InvalidRequest(f"dp must be at most {MAX_DP} characters and hold no NUL")
