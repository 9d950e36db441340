"""Which logical volumes of an SR are active on this host, and who holds them.

An LV is *active* when it has a block device here.  Activation is
reference-counted per host: every user is a *holder* of the volumes it needs
(a datapath holds its VDI's whole chain as ``dp:<leaf>`` from VDI.attach to
VDI.detach; an SR operation holds what it opens as ``pid:<pid>:<start>``
for its own duration, and a holder whose process is gone is dropped by the
next change).  A volume is deactivated when its last holder lets go.

The record, ``<base>/active.json`` (``base`` = ``<run_dir>/lvhd/<sr>``), is
changed only under the lock ``<base>/active.lock``; each active volume has a
symlink ``<base>/dev/<volume>`` to its device, so a VHD chain's parent
locators (``./<volume>``) resolve inside that one directory.

Two ways to make the device (``smcommon.lvhd`` picks, device-mapper first):

- ``DmActivator``: ``lvchange -ay`` and the device-mapper node ``/dev/VG/LV``;
- ``LoopActivator``, where the kernel has no device-mapper: a loop device over
  the LV's extents on the physical volume (``--offset`` = ``pe_start`` +
  first extent x extent size, ``--sizelimit`` = the LV's size).  That needs
  the LV in one segment: the store allocates contiguously.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from smcommon import loop
from smcommon.errors import BackendError
from smcommon.fileio import atomic_write_json
from smcommon.lvm import Lv, Lvm, LvmError

log = logging.getLogger(__name__)

DM_NODE_TIMEOUT = 10.0


class Activator(Protocol):
    name: str

    def activate(self, lv: Lv) -> dict[str, Any]: ...
    def deactivate(self, entry: dict[str, Any]) -> None: ...
    def matches(self, entry: dict[str, Any], lv: Lv) -> bool: ...
    def renamed(self, entry: dict[str, Any], lv: str) -> dict[str, Any]: ...
    def orphans(self, known: set[str]) -> list[str]: ...


class LoopActivator:
    """A loop device over the LV's extents on the physical volume."""

    name = "loop devices over the LVs' extents (no device-mapper)"

    def __init__(self, pv: str, pe_start: int, extent: int,
                 runner: Callable[..., Any] | None = None) -> None:
        self.pv, self.pe_start, self.extent, self.runner = pv, pe_start, extent, runner

    def span(self, lv: Lv) -> tuple[int, int]:
        """(offset on the PV, bytes) of a single-segment LV."""
        if len(lv.segments) != 1 or lv.segments[0].pv != self.pv:
            raise BackendError("LV_NOT_CONTIGUOUS", [
                (f"{lv.name} has {len(lv.segments)} segments on {[s.pv for s in lv.segments]}: "
                f"without device-mapper an LV must lie in one piece on {self.pv}")])
        return self.pe_start + lv.segments[0].pv_start * self.extent, lv.size

    def activate(self, lv: Lv) -> dict[str, Any]:
        offset, size = self.span(lv)
        dev = loop.attach(self.pv, offset=offset, size=size, runner=self.runner)
        return {"lv": lv.name, "dev": dev, "offset": offset, "size": size}

    def deactivate(self, entry: dict[str, Any]) -> None:
        dev = entry.get("dev", "")
        for lp in loop.list_loops(self.runner):
            if lp.name == dev and lp.back_file == self.pv and lp.offset == entry.get("offset"):
                flush(dev)
                loop.detach(dev, self.runner)
                return
        log.warning("loop device %s of %s was already gone", dev, entry.get("lv"))

    def matches(self, entry: dict[str, Any], lv: Lv) -> bool:
        try:
            return entry.get("lv") == lv.name and (entry.get("offset"), entry.get("size")) == \
                self.span(lv)
        except BackendError:
            return False

    def renamed(self, entry: dict[str, Any], lv: str) -> dict[str, Any]:
        """The record after an lvrename: a loop maps extents, which stay."""
        return {**entry, "lv": lv}

    def orphans(self, known: set[str]) -> list[str]:
        """Detach loop devices over the PV that no record names (a process
        killed between losetup and its record); the callers hold the lock
        under which every live process makes its devices."""
        gone = []
        for lp in loop.list_loops(self.runner):
            if lp.back_file == self.pv and lp.name not in known:
                flush(lp.name)
                loop.detach(lp.name, self.runner)
                gone.append(lp.name)
        return gone


class DmActivator:
    """device-mapper: lvchange -ay/-an; the device is /dev/<vg>/<lv>."""

    name = "device-mapper (lvchange -ay)"

    def __init__(self, lvm: Lvm, vg: str, dev_root: str = "/dev") -> None:
        self.lvm, self.vg, self.dev_root = lvm, vg, dev_root

    def activate(self, lv: Lv) -> dict[str, Any]:
        self.lvm.lvchange_active(self.vg, lv.name, True)
        dev = os.path.join(self.dev_root, self.vg, lv.name)
        deadline = time.monotonic() + DM_NODE_TIMEOUT
        while not os.path.exists(dev):
            if time.monotonic() > deadline:
                raise BackendError("LV_NO_DEVICE", [f"{dev} did not appear after lvchange -ay"])
            time.sleep(0.05)
        return {"lv": lv.name, "dev": dev, "size": lv.size}

    def deactivate(self, entry: dict[str, Any]) -> None:
        flush(entry.get("dev", ""))
        try:
            self.lvm.lvchange_active(self.vg, entry["lv"], False)
        except LvmError as e:
            if e.code != "LVM_LV_NOT_FOUND":
                raise

    def matches(self, entry: dict[str, Any], lv: Lv) -> bool:
        return entry.get("lv") == lv.name

    def renamed(self, entry: dict[str, Any], lv: str) -> dict[str, Any]:
        """After an lvrename device-mapper names the device after the new name."""
        return {**entry, "lv": lv, "dev": os.path.join(self.dev_root, self.vg, lv)}

    def orphans(self, known: set[str]) -> list[str]:
        """device-mapper devices are found by LV name: nothing is lost track of."""
        return []


def flush(dev: str) -> None:
    """fsync a device before it goes: what its page cache holds reaches the disk."""
    with contextlib.suppress(OSError):
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_holder(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"pid:{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return "" if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: str) -> bool:
    if not holder.startswith("pid:"):
        return True
    _, pid, start = (holder.split(":") + ["", ""])[:3]
    try:
        return bool(start) and _start_time(int(pid)) == start
    except ValueError:
        return False


class Activations:
    """The active volumes of one SR on this host (see the module doc)."""

    def __init__(self, base: Path, activator: Activator) -> None:
        self.base = Path(base)
        self.devdir = self.base / "dev"
        self.file = self.base / "active.json"
        self.activator = activator

    def path(self, key: str) -> str:
        return str(self.devdir / key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        from smcommon.lock import Lock

        self.devdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with Lock("active", self.base, timeout=120.0):
            state = self._load()
            before = json.dumps(state, sort_keys=True)
            try:
                self._sweep(state)
                yield state
            finally:
                if json.dumps(state, sort_keys=True) != before:
                    atomic_write_json(self.file, {"format": 1, "volumes": state})

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.file.read_text())
            vols = doc.get("volumes", {})
            return vols if isinstance(vols, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError):
            log.warning("unreadable %s: starting from nothing", self.file)
            return {}

    def _sweep(self, state: dict[str, dict[str, Any]]) -> None:
        """Drop holders whose process is gone; deactivate what nobody holds."""
        for key in list(state):
            entry = state[key]
            entry["holders"] = [h for h in entry.get("holders", []) if _alive(h)]
            if not entry["holders"]:
                self._off(state, key)

    def _off(self, state: dict[str, dict[str, Any]], key: str) -> None:
        entry = state.pop(key)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.devdir):  # its name, and a name kept for it
                with contextlib.suppress(OSError):
                    if os.readlink(self.devdir / name) == entry.get("dev"):
                        os.unlink(self.devdir / name)
        self.activator.deactivate(entry)
        log.info("deactivated %s (%s)", key, entry.get("dev"))

    def _link(self, key: str, dev: str) -> None:
        tmp = self.devdir / f".{key}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(dev, tmp)
        os.replace(tmp, self.devdir / key)

    # --- holding and releasing -----------------------------------------------------

    def hold(self, wants: Iterable[tuple[str, Lv]], holder: str) -> list[str]:
        """Activate (if needed) each (volume, LV) for ``holder``; their paths."""
        paths = []
        with self._locked() as state:
            for key, lv in wants:
                entry = state.get(key)
                if entry is not None and not self.activator.matches(entry, lv):
                    others = [h for h in entry["holders"] if h != holder]
                    if others:
                        raise BackendError("LV_ACTIVE_ELSEWHERE", [
                            (f"{key} is active as {entry.get('lv')} for {', '.join(others)}: "
                            "it cannot change under them")])
                    self._off(state, key)
                    entry = None
                if entry is None:
                    entry = self.activator.activate(lv)
                    entry["holders"] = []
                    state[key] = entry
                    log.info("activated %s (%s) as %s", key, lv.name, entry["dev"])
                self._link(key, entry["dev"])
                if holder not in entry["holders"]:
                    entry["holders"].append(holder)
                paths.append(self.path(key))
        return paths

    def release(self, keys: Iterable[str], holder: str) -> None:
        with self._locked() as state:
            for key in keys:
                entry = state.get(key)
                if entry is None:
                    continue
                entry["holders"] = [h for h in entry["holders"] if h != holder]
                if not entry["holders"]:
                    self._off(state, key)

    def release_holder(self, holder: str) -> list[str]:
        """Let go of everything ``holder`` holds; the volumes it held."""
        with self._locked() as state:
            held = [k for k, e in state.items() if holder in e.get("holders", [])]
        self.release(held, holder)
        return held

    def holders(self, key: str) -> list[str]:
        return [h for h in self._load().get(key, {}).get("holders", []) if _alive(h)]

    def active(self) -> dict[str, dict[str, Any]]:
        """Every active volume and its record (holders still alive)."""
        state = self._load()
        for entry in state.values():
            entry["holders"] = [h for h in entry.get("holders", []) if _alive(h)]
        return state

    def drop(self, key: str, holder: str | None = None) -> None:
        """Deactivate ``key`` before its LV is renamed, resized or removed;
        refused while anyone but ``holder`` holds it."""
        with self._locked() as state:
            entry = state.get(key)
            if entry is None:
                return
            others = [h for h in entry["holders"] if h != holder]
            if others:
                raise BackendError("VDI_IN_USE", [
                    f"volume {key} is active on this host for {', '.join(others)}"])
            self._off(state, key)

    def rename(self, old: str, new: str, lv: str, keep_link: bool = False) -> list[str]:
        """Volume ``old``'s LV was renamed to ``lv``, now volume ``new``: its
        activation (device, holders) goes with it; ``old``'s link stays if
        ``keep_link`` (a path in use keeps its device until replaced).  The
        holders moved."""
        with self._locked() as state:
            entry = state.pop(old, None)
            if entry is None:
                return []
            if new in state:
                if any(h for h in state[new]["holders"]):
                    state[old] = entry
                    raise BackendError("LV_ACTIVE_ELSEWHERE", [
                        f"{new} is active: {old} cannot take its name"])
                self._off(state, new)
            entry = self.activator.renamed(entry, lv)
            state[new] = entry
            self._link(new, entry["dev"])
            if keep_link:
                self._link(old, entry["dev"])  # (device-mapper renamed the device)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.devdir / old)
            return list(entry["holders"])

    def sweep_orphans(self) -> list[str]:
        """Devices of this SR that no record names (killed processes): removed."""
        with self._locked() as state:
            return self.activator.orphans({e.get("dev", "") for e in state.values()})

    def forget(self, key: str) -> None:
        """Deactivate ``key`` whoever holds it (recovery rebuilds what it held)."""
        with self._locked() as state:
            if key in state:
                self._off(state, key)

    def release_all(self) -> list[str]:
        """Deactivate every volume of the SR (SR.detach): what was active, and
        devices of killed processes no record names."""
        with self._locked() as state:
            keys = list(state)
            for key in keys:
                self._off(state, key)
            keys += self.activator.orphans(set())
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()
        return keys
