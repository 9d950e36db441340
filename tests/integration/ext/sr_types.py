"""The SR types the plugin suites of this directory run over: one entry each.

Every test that uses the ``ext`` fixture (the plugin caller) runs once per
type (``sr_type``: ids ``[ext]``, ``[nfs]``, ``[lvmoiscsi]``); ``each_sr`` runs
once per kind of SR of each type (``sr_kind``: ``[ext-path]``, ``[nfs-nfs4.1]``,
``[lvmoiscsi-iscsi]``).  A test
marked ``@pytest.mark.sr_types("ext")`` runs for those types only (what is
specific to one type's device_config).

An entry: the plugin executable, the kinds of SR it makes (the first is the
default of ``sr`` and ``make_sr.make()``; ``SrFactory.make`` knows how to make
each kind), the kinds needing root, and the fixture that gives the type its
backend, as ``(server object or None, extra environment of every call)``.
Adding a type is one entry here, its kinds in ``SrFactory.make``, and its
backend fixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class SrTypeSpec:
    name: str
    plugin: Path
    kinds: tuple[str, ...]
    root_kinds: frozenset[str] = field(default_factory=frozenset)
    backend: str | None = None  # fixture name -> (server, env)
    config_keys: frozenset[str] = field(default_factory=frozenset)  # Query.query lists them

    def marks(self, kind: str | None = None) -> list[Any]:
        needs_root = bool(self.backend) or kind in self.root_kinds
        return [pytest.mark.root] if needs_root else []


SR_TYPES = {
    "ext": SrTypeSpec(
        "ext",
        REPO / "plugins" / "ext" / "EXTSR",
        ("path", "ext4"),
        frozenset({"ext4"}),
        config_keys=frozenset({"device", "path"}),
    ),
    "nfs": SrTypeSpec(
        "nfs",
        REPO / "plugins" / "nfs" / "NFSSR",
        ("nfs3", "nfs4.1"),
        frozenset({"nfs3", "nfs4.1"}),
        backend="nfs_backend",
        config_keys=frozenset({"server", "serverpath", "nfsversion", "port", "options"}),
    ),
    "lvmoiscsi": SrTypeSpec(
        "lvmoiscsi",
        REPO / "plugins" / "lvmoiscsi" / "LVMoISCSISR",
        ("iscsi",),  # a LUN of the session's tgtd, with CHAP
        frozenset({"iscsi"}),
        backend="iscsi_backend",
        config_keys=frozenset({"target", "port", "targetIQN", "SCSIid", "chapuser",
                               "chappassword", "incoming_chapuser",
                               "incoming_chappassword", "multihomed"}),
    ),
}
