"""The routing table: which SR type serves each SR this dispatcher has seen.

Owns ``RouteTable``, kept as one JSON file under the host's state dir
(``<state_dir>/dispatcher/routes.json``)::

    {"version": 1,
     "srs": {"<sr uuid>": {"type": "ext"}, ...},
     "default_srs": {"<absolute dir>": "<sr uuid>", ...}}

An SR is learnt when SR.create or SR.attach succeeded through ``POST /<type>``
and forgotten when SR.destroy succeeded.  SRs attached on this host without
the dispatcher (a plugin run by hand, ``smctl --direct``) are found in the
host's registry of attached SRs (``smcommon.engine.host``), which every
plugin keeps: ``get`` and ``srs`` answer for them too, so every SR attached
on this host is routed and listed, however it was attached.  Every change is written to a
temporary file, fsync'd, renamed over the table and the directory fsync'd
before the call's response is sent, so a dispatcher killed at any instant
keeps every route it acknowledged.  A table that cannot be read is moved
aside (``routes.json.corrupt-<time>``) and logged, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from smcommon.engine.host import HostRegistry
from smcommon.fileio import atomic_write, private_dir
from smcommon.paths import Paths

log = logging.getLogger(__name__)

VERSION = 1


def routes_path(paths: Paths) -> Path:
    return paths.state_dir / "dispatcher" / "routes.json"


class RouteTable:
    def __init__(self, path: Path, host: HostRegistry | None = None) -> None:
        self.path = path
        self.host = host
        self._lock = threading.Lock()
        self._srs: dict[str, str] = {}
        self._defaults: dict[str, str] = {}
        self._load()

    # -- reading ---------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            srs = {str(k): str(v["type"]) for k, v in doc.get("srs", {}).items()}
            defaults = {str(k): str(v) for k, v in doc.get("default_srs", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error(
                "routing table %s is unreadable (%s): moved to %s, starting empty",
                self.path,
                e,
                aside,
            )
            return
        self._srs = srs
        self._defaults = defaults

    @classmethod
    def for_host(cls, paths: Paths) -> RouteTable:
        """The table of this host: learnt routes plus the host's attached SRs."""
        return cls(routes_path(paths), HostRegistry(paths))

    def get(self, sr: str) -> str | None:
        with self._lock:
            learnt = self._srs.get(sr)
        if learnt is not None or self.host is None:
            return learnt
        try:
            entry = self.host.get(sr)
        except Exception:  # noqa: BLE001 -- a bad name or an unreadable entry: unknown
            return None
        return entry.type if entry is not None else None

    def srs(self) -> dict[str, str]:
        attached = {e.sr: e.type for e in self.host.entries()} if self.host else {}
        with self._lock:
            return attached | self._srs

    def default_for(self, directory: str) -> str | None:
        with self._lock:
            return self._defaults.get(directory)

    # -- changing --------------------------------------------------------------

    def learn(self, sr: str, sr_type: str) -> None:
        with self._lock:
            if self._srs.get(sr) == sr_type:
                return
            self._srs[sr] = sr_type
            self._save()

    def forget(self, sr: str) -> None:
        with self._lock:
            if sr not in self._srs:
                return
            del self._srs[sr]
            for d in [d for d, u in self._defaults.items() if u == sr]:
                del self._defaults[d]
            self._save()

    def set_default(self, directory: str, sr: str, sr_type: str) -> None:
        with self._lock:
            if self._defaults.get(directory) == sr and self._srs.get(sr) == sr_type:
                return
            self._defaults[directory] = sr
            self._srs[sr] = sr_type
            self._save()

    def _doc(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "srs": {sr: {"type": t} for sr, t in sorted(self._srs.items())},
            "default_srs": dict(sorted(self._defaults.items())),
        }

    def _save(self) -> None:
        private_dir(self.path.parent)
        atomic_write(self.path, json.dumps(self._doc(), indent=1).encode())
