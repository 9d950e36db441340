"""VDI metadata records and the SR identity file, kept in the SR.

This module owns the SR's own metadata directory ``<sr dir>/.sm/``::

    .sm/sr.json            the SR identity: {"sr": <uuid>, "type": ..., ...}
    .sm/vdi/<vdi>.json     one record per VDI: its SMAPI fields and its leaf volume
    .sm/gc.json            the garbage collector's journal (smcommon.engine.gc)

Every file is written atomically (temp file, fsync, rename, fsync of the
directory), so a process killed at any instant leaves the old or the new
record, never a torn one.  Temp files start with a dot and are never read as
records; ``cleanup_temp`` removes leftovers of killed processes.

A record maps the VDI key to its *current leaf volume* (``volume``): the
writable top of its VHD chain.  ``epoch_base`` is the hidden volume that holds
a non-persistent VDI's content (VDI.set_persistent false); the VDI's leaf is a
child of it that VDI.epoch_begin replaces with an empty one.

SR.scan reads only these records (plus one ``stat`` of each leaf), never a
VHD chain, so it stays fast for thousands of VDIs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from smcommon.errors import BackendError, InvalidRequest, VdiDoesNotExist
from smcommon.fileio import atomic_write_json, fsync_dir, unlink_durable
from smcommon.paths import safe_name
from smcommon.record import asdict, field, field_names, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

SM_DIR = ".sm"
FORMAT = 1


@record
class VdiRecord:
    """One VDI: the SMAPI vdi_info fields, minus physical_utilisation (live)."""

    vdi: str
    volume: str
    name_label: str = ""
    name_description: str = ""
    ty: str = "user"
    content_id: str = ""
    metadata_of_pool: str = ""
    is_a_snapshot: bool = False
    snapshot_time: str = ""
    snapshot_of: str = ""
    read_only: bool = False
    virtual_size: int = 0
    persistent: bool = True
    sm_config: dict[str, str] = field(default_factory=dict)
    epoch_base: str | None = None
    created: str = ""

    def to_vdi_info(self, physical_utilisation: int) -> dict[str, Any]:
        return {
            "vdi": self.vdi,
            "content_id": self.content_id,
            "name_label": self.name_label,
            "name_description": self.name_description,
            "ty": self.ty,
            "metadata_of_pool": self.metadata_of_pool,
            "is_a_snapshot": self.is_a_snapshot,
            "snapshot_time": self.snapshot_time,
            "snapshot_of": self.snapshot_of,
            "read_only": self.read_only,
            "virtual_size": int(self.virtual_size),
            "physical_utilisation": int(physical_utilisation),
            "persistent": self.persistent,
            "sm_config": dict(self.sm_config),
        }

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["format"] = FORMAT
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VdiRecord:
        rec = cls(**{k: v for k, v in doc.items() if k in _FIELDS})
        if not isinstance(rec.vdi, str) or not isinstance(rec.volume, str):
            raise TypeError("vdi and volume must be strings")
        try:
            safe_name("vdi", rec.vdi)
            safe_name("volume", rec.volume)
            if rec.epoch_base is not None:
                safe_name("epoch_base", rec.epoch_base)
        except InvalidRequest as e:
            raise ValueError(str(e)) from None
        rec.virtual_size = int(rec.virtual_size)
        rec.sm_config = {str(k): str(v) for k, v in dict(rec.sm_config).items()}
        return rec


_FIELDS = frozenset(field_names(VdiRecord))


def _read_small(name: str, dir_fd: int) -> bytes:
    """A whole small file in the directory ``dir_fd``: open, one read, close
    (a regular file reads short only at its end)."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        data = os.read(fd, _SMALL)
        if len(data) < _SMALL:
            return data
        chunks = [data]
        while chunk := os.read(fd, _SMALL):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


_SMALL = 1 << 16
# raw_decode: json.loads without its str/bytes dispatch (a record is UTF-8,
# stripped of a BOM and surrounding space first, as json.loads would take it)
_DECODER = json.JSONDecoder()


class MetadataCorrupt(BackendError):
    def __init__(self, path: Path, why: str) -> None:
        super().__init__("VDI_METADATA_CORRUPT", [str(path), why])


def read_json(path: Path) -> Any:
    """The JSON document at ``path``, None if absent; MetadataCorrupt if unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MetadataCorrupt(path, e.strerror or str(e)) from None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise MetadataCorrupt(path, f"not JSON: {e}") from None


class Metadata:
    """The metadata of one SR, rooted at ``sr_dir``."""

    def __init__(self, sr_dir: Path) -> None:
        self.sr_dir = Path(sr_dir)
        self.sm_dir = self.sr_dir / SM_DIR
        self.vdi_dir = self.sm_dir / "vdi"
        self.sr_file = self.sm_dir / "sr.json"
        self.gc_file = self.sm_dir / "gc.json"

    # --- the SR identity ---------------------------------------------------

    def read_sr(self) -> dict[str, Any] | None:
        doc = read_json(self.sr_file)
        if doc is not None and not isinstance(doc, dict):
            raise MetadataCorrupt(self.sr_file, "not an object")
        return doc

    def write_sr(self, doc: dict[str, Any]) -> None:
        self.vdi_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.sr_dir)
        atomic_write_json(self.sr_file, doc)

    # --- VDI records -------------------------------------------------------

    def _path(self, vdi: str) -> Path:
        return self.vdi_dir / (safe_name("vdi", vdi) + ".json")

    def exists(self, vdi: str) -> bool:
        return self._path(vdi).exists()

    def get(self, vdi: str) -> VdiRecord:
        path = self._path(vdi)
        doc = read_json(path)
        if doc is None:
            raise VdiDoesNotExist(vdi)
        return self._parse(path, doc)

    @staticmethod
    def _parse(path: Path, doc: Any) -> VdiRecord:
        try:
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            return VdiRecord.from_json(doc)
        except (TypeError, ValueError) as e:
            raise MetadataCorrupt(path, f"{type(e).__name__}: {e}") from None

    def put(self, rec: VdiRecord) -> None:
        atomic_write_json(self._path(rec.vdi), rec.to_json())

    def remove(self, vdi: str) -> bool:
        return unlink_durable(self._path(vdi))

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.vdi_dir)
        except FileNotFoundError:
            return []
        return sorted(
            n[:-5] for n in entries if n.endswith(".json") and not n.startswith(".")
        )

    def all(self) -> tuple[list[VdiRecord], list[str]]:
        """Every readable record, and a note for each unreadable one.

        The hot path of SR.scan (10,000 records): each read relative to the
        directory, with one read call, parsed by the JSON scanner as it is.
        """
        recs: list[VdiRecord] = []
        bad: list[str] = []
        try:
            dir_fd = os.open(self.vdi_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return recs, bad
        try:
            for name in self.names():
                try:
                    text = _read_small(name + ".json", dir_fd).decode().lstrip("\ufeff").strip()
                    doc, end = _DECODER.raw_decode(text)
                    if end != len(text):
                        raise ValueError(f"data after the record, at {end}")
                    if not isinstance(doc, dict):
                        raise TypeError("not an object")
                    recs.append(VdiRecord.from_json(doc))
                except FileNotFoundError:
                    continue  # removed since listdir
                except (OSError, ValueError, TypeError) as e:
                    err = MetadataCorrupt(self.vdi_dir / f"{name}.json", f"{type(e).__name__}: {e}")
                    log.warning("skipping unreadable VDI record: %s", err)
                    bad.append(str(err))
                except MetadataCorrupt as e:
                    log.warning("skipping unreadable VDI record: %s", e)
                    bad.append(str(e))
        finally:
            os.close(dir_fd)
        return recs, bad

    def records(self) -> list[VdiRecord]:
        return self.all()[0]

    def cleanup_temp(self) -> int:
        """Remove temp files left by killed writers; how many were removed."""
        n = 0
        for d in (self.sm_dir, self.vdi_dir):
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(d):
                    if name.startswith(".") and name.endswith(".tmp"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(d / name)
                            n += 1
        return n
