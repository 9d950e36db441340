"""Garbage collection through the real EXTSR: after destroys no unneeded hidden
image is left, data reads the same, active chains are never touched."""

from __future__ import annotations

import pytest
from ext_helpers import BLOCK, SR, MiB

pytestmark = pytest.mark.integration

K4 = 4096


def pat(tag: str) -> bytes:
    unit = (tag.encode() + b"-") * 8
    return (unit * (K4 // len(unit) + 1))[:K4]


def test_gc_after_destroys_leaves_only_what_is_needed(each_sr: SR) -> None:
    sr = each_sr
    a = sr.create("a", 8 * MiB)["vdi"]
    b = sr.create("b", 8 * MiB)["vdi"]
    sr.write(a, {0: pat("a0")})
    s1 = sr.snapshot(a)["vdi"]
    sr.write(a, {BLOCK: pat("a1")})
    s2 = sr.snapshot(a)["vdi"]
    sr.write(a, {2 * BLOCK: pat("a2")})
    c = sr.clone(s1)["vdi"]
    sr.write(c, {3 * BLOCK: pat("c3")})
    want_a = [pat("a0"), pat("a1"), pat("a2"), b"\0" * K4]
    want_c = [pat("a0"), b"\0" * K4, b"\0" * K4, pat("c3")]
    ranges = [(i * BLOCK, K4) for i in range(4)]
    assert sr.read(a, ranges) == want_a
    assert sr.read(c, ranges) == want_c
    assert len([i for i in sr.vhd_files().values() if i.hidden]) >= 3

    sr.ok("VDI.destroy", vdi=s2)
    sr.ok("VDI.destroy", vdi=s1)
    sr.ok("SR.gc")
    scan = sr.assert_consistent(after_gc=True)
    assert set(scan) == {a, b, c}
    assert sr.read(a, ranges) == want_a
    assert sr.read(c, ranges) == want_c

    sr.ok("VDI.destroy", vdi=c)
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
    files = sr.vhd_files()
    # a and b only, each a single image: nothing hidden is needed any more
    assert [i for i in files.values() if i.hidden] == []
    assert len(files) == 2
    assert sr.read(a, ranges) == want_a
    assert "gc" in sr.ext.ok("Query.diagnostics").lower()


def test_gc_runs_after_destroy_by_itself(sr: SR) -> None:
    a = sr.create("a", 8 * MiB)["vdi"]
    sr.write(a, {0: pat("x")})
    s = sr.snapshot(a)["vdi"]
    sr.ok("VDI.destroy", vdi=s)
    # no SR.gc call: the destroy created garbage, the collector process ran
    sr.wait_gc()
    files = sr.vhd_files()
    assert [i for i in files.values() if i.hidden] == [], files
    assert len(files) == 1
    assert sr.read(a, [(0, K4)]) == [pat("x")]


def test_gc_never_touches_an_active_chain(sr: SR) -> None:
    from smcommon import vhd

    a = sr.create("a", 8 * MiB)["vdi"]
    sr.write(a, {0: pat("p0")})
    s = sr.snapshot(a)["vdi"]
    sr.write(a, {BLOCK: pat("p1")})
    path = sr.attach(a, "vm", True)
    sr.ok("VDI.activate", dp="vm", vdi=a)
    chain_before = vhd.chain(path)
    assert len(chain_before) == 2
    sr.ok("VDI.destroy", vdi=s)  # the parent now has a single child: a's leaf
    sr.ok("SR.gc")
    # the running VM's chain is as it was, and works
    assert vhd.chain(path) == chain_before
    assert vhd.read(path, 0, K4) == pat("p0")
    vhd.write(path, 2 * BLOCK, pat("p2"))
    diag = sr.ext.ok("Query.diagnostics")
    assert isinstance(diag, str)
    sr.ok("VDI.deactivate", dp="vm", vdi=a)
    sr.ok("VDI.detach", dp="vm", vdi=a)
    # now it may coalesce
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
    assert [i for i in sr.vhd_files().values() if i.hidden] == []
    ranges = [(0, K4), (BLOCK, K4), (2 * BLOCK, K4)]
    assert sr.read(a, ranges) == [pat("p0"), pat("p1"), pat("p2")]


def test_gc_on_an_empty_and_on_a_detached_sr(sr: SR) -> None:
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
    sr.ok("SR.detach")
    err = sr.err("SR.gc")
    assert err == ["Sr_not_attached", sr.uuid]


def test_gc_keeps_the_epoch_base_of_a_non_persistent_vdi(sr: SR) -> None:
    v = sr.create("np", 8 * MiB)["vdi"]
    sr.write(v, {0: pat("base")})
    sr.ok("VDI.set_persistent", vdi=v, persistent=False)
    sr.ok("VDI.epoch_begin", vdi=v)
    sr.write(v, {0: pat("epoch")})
    sr.ok("SR.gc")
    sr.assert_consistent()
    sr.ok("VDI.epoch_begin", vdi=v)
    assert sr.read(v, [(0, K4)]) == [pat("base")]


def test_long_chain_collapses(sr: SR) -> None:
    """A running VM writes between six snapshots (its path stays valid), the
    snapshots are destroyed; once the VM stops the chain collapses to one image."""
    from smcommon import vhd

    v = sr.create("chain", 8 * MiB)["vdi"]
    snaps = []
    with sr.opened(v, rw=True) as path:
        for i in range(6):
            vhd.write(path, i * K4, pat(f"g{i}"))
            snaps.append(sr.snapshot(v)["vdi"])
        for s in snaps:
            sr.ok("VDI.destroy", vdi=s)
        vhd.write(path, 6 * K4, pat("g6"))
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
    assert len(sr.vhd_files()) == 1
    assert sr.read(v, [(i * K4, K4) for i in range(7)]) == [
        pat(f"g{i}") for i in range(7)
    ]
