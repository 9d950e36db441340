"""This host's registry of attached SRs, under ``Paths.state_dir``.

One JSON file per attached SR, ``<state_dir>/sr/<sr>.json``:
``{"sr", "type", "sr_dir", "device_config", "mounted", "attached"}``;
``device_config`` keeps only the keys the SR type declares (its Query.query
``configuration``) and none it declares secret (``SrType.secret_keys``:
CHAP passwords ...; ``public_config``).  Files are 0600, the directory 0700.
SR.attach
writes it, SR.detach/destroy/reset remove it, SR.ls lists it, and every VDI
call reads it to find the SR's directory (no entry: ``Sr_not_attached``).
Writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import os
from pathlib import Path

from smcommon.engine.meta import MetadataCorrupt, read_json
from smcommon.errors import SrNotAttached
from smcommon.fileio import atomic_write_json, private_dir, unlink_durable
from smcommon.paths import Paths, safe_name
from smcommon.record import asdict, field, field_names, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any


def public_config(
    device_config: dict[str, str], known: Iterable[str], secret: Iterable[str] | None
) -> dict[str, str]:
    """What of ``device_config`` may be written down: the ``known`` keys (the
    SR type's declared configuration) that are not ``secret``.  An SR type that
    declares no secrets (None) has nothing written down."""
    if secret is None:
        return {}
    keep = set(known) - set(secret)
    return {k: v for k, v in device_config.items() if k in keep}


@record
class Attached:
    sr: str
    type: str
    sr_dir: str
    device_config: dict[str, str] = field(default_factory=dict)
    mounted: bool = False
    attached: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class HostRegistry:
    """The SRs attached on this host."""

    def __init__(self, paths: Paths) -> None:
        self.dir = paths.state_dir / "sr"

    def _path(self, sr: str) -> Path:
        return self.dir / (safe_name("sr", sr) + ".json")

    def get(self, sr: str) -> Attached | None:
        path = self._path(sr)
        doc = read_json(path)
        if doc is None:
            return None
        try:
            return Attached(
                **{k: doc[k] for k in field_names(Attached) if k in doc}
            )
        except TypeError as e:
            raise MetadataCorrupt(path, str(e)) from None

    def require(self, sr: str) -> Attached:
        entry = self.get(sr)
        if entry is None:
            raise SrNotAttached(sr)
        return entry

    def put(self, entry: Attached) -> None:
        private_dir(self.dir)
        atomic_write_json(self._path(entry.sr), entry.to_json())

    def remove(self, sr: str) -> bool:
        return unlink_durable(self._path(sr))

    def srs(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(
            n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")
        )

    def entries(self) -> list[Attached]:
        out = []
        for sr in self.srs():
            entry = self.get(sr)
            if entry is not None:
                out.append(entry)
        return out
