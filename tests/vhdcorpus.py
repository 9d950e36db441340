"""The blktap corpus (tests/data/vhd-corpus): five VHD images made by blktap's
own vhd-util and written through libvhd's vhd_io_write, the write path of
tapdisk, with a manifest of every write.  Tests extract the tarball into a
temporary directory and work on the copies.

``model(name)`` rebuilds an image's whole virtual disk from the manifest alone
(each written sector holds ``"<tag> sector <number> "`` repeated), so a test
can compare what any tool reads with what blktap wrote, sector by sector.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

DIR = Path(__file__).resolve().parent / "data" / "vhd-corpus"
TARBALL = DIR / "blktap-corpus.tar.xz"
SECTOR = 512
NAMES = ("empty.vhd", "prealloc.vhd", "base.vhd", "child.vhd", "grandchild.vhd")


@cache
def manifest() -> dict[str, Any]:
    return json.loads((DIR / "MANIFEST.json").read_text())  # type: ignore[no-any-return]


def entry(name: str) -> dict[str, Any]:
    return manifest()["images"][name]  # type: ignore[no-any-return]


def extract(dest: Path) -> Path:
    """Extract the five images into ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL, "r:xz") as tar:
        # regular members only, written by name: no path from the archive is used
        # (tarfile's extraction filters need Python 3.11.4; Debian 12 has 3.11.2)
        for m in tar.getmembers():
            name = Path(m.name).name
            if m.isfile() and name in NAMES:
                src = tar.extractfile(m)
                assert src is not None
                (dest / name).write_bytes(src.read())
    for name in NAMES:
        (dest / name).chmod(0o644)
    return dest


def sector_data(tag: str, sector: int) -> bytes:
    unit = f"{tag} sector {sector:010d} ".encode()
    return (unit * (SECTOR // len(unit) + 1))[:SECTOR]


def writes(name: str) -> list[tuple[int, int, str]]:
    """(first sector, count, tag) of the image's own writes, in order."""
    return [(w["sector"], w["count"], w["tag"]) for w in entry(name)["writes"] if "tag" in w]


def chain(name: str) -> list[str]:
    """The image and its ancestors, leaf first."""
    out = [name]
    while entry(out[-1])["parent"]:
        out.append(entry(out[-1])["parent"])
    return out


@cache
def _model(name: str) -> bytes:
    disk = bytearray(entry(name)["virtual_size"])
    for image in reversed(chain(name)):
        for first, count, tag in writes(image):
            for s in range(first, first + count):
                disk[s * SECTOR : (s + 1) * SECTOR] = sector_data(tag, s)
    return bytes(disk)


def model(name: str) -> bytearray:
    """The whole virtual disk of ``name`` (through its chain) as blktap wrote it."""
    return bytearray(_model(name))


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()
