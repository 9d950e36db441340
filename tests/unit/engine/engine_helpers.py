"""Helpers of the engine unit tests (imported by conftest.py, which puts this
directory on sys.path: the test suite uses --import-mode=importlib)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smcommon.engine.sr import SrEngine

MiB = 1024 * 1024
BLOCK = 2 * MiB
K4 = 4096
SR = "sr-unit"


def pat(tag: str, size: int = K4) -> bytes:
    unit = (tag.encode() + b"-") * 8
    return (unit * (size // len(unit) + 1))[:size]


def write(eng: SrEngine, vdi: str, data: dict[int, bytes]) -> None:
    from smcommon import vhd

    path = eng.store.path(eng.get(vdi).volume)
    for off, buf in data.items():
        vhd.write(path, off, buf)


def read(eng: SrEngine, vdi: str, offsets: list[int], length: int = K4) -> list[bytes]:
    from smcommon import vhd

    path = eng.store.path(eng.get(vdi).volume)
    return [vhd.read(path, off, length) for off in offsets]


def hidden_volumes(eng: SrEngine) -> list[str]:
    return sorted(v for v, n in eng.store.tree().items() if n.hidden)


def inline_gc(eng: SrEngine) -> None:
    """What the engine calls after making garbage: here a collector pass in
    this process, at once (the SR's collector process is tested end to end in
    tests/integration/ext)."""
    from smcommon.engine.gc import Collector

    Collector(eng).run()
