"""This host's registry of attached SRs, under ``Paths.state_dir``.

One JSON file per attached SR, ``<state_dir>/sr/<sr>.json``:
``{"sr", "type", "sr_dir", "device_config", "mounted", "attached"}``;
``device_config`` is kept minus anything that looks like a secret (keys
holding "password", "secret", "chap", "key" in their name).  SR.attach
writes it, SR.detach/destroy/reset remove it, SR.ls lists it, and every VDI
call reads it to find the SR's directory (no entry: ``Sr_not_attached``).
Writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smcommon.engine.meta import MetadataCorrupt, read_json
from smcommon.errors import SrNotAttached
from smcommon.fileio import atomic_write_json, unlink_durable
from smcommon.paths import Paths, safe_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SECRET_WORDS = ("password", "secret", "chap", "key")


def public_config(device_config: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in device_config.items()
        if not any(w in k.lower() for w in SECRET_WORDS)
    }


@dataclass
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
                **{k: doc[k] for k in Attached.__dataclass_fields__ if k in doc}
            )
        except TypeError as e:
            raise MetadataCorrupt(path, str(e)) from None

    def require(self, sr: str) -> Attached:
        entry = self.get(sr)
        if entry is None:
            raise SrNotAttached(sr)
        return entry

    def put(self, entry: Attached) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
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
