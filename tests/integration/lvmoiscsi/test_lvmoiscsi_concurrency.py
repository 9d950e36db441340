"""Many LVMoISCSISR processes at once on one SR (real tgtd LUN, real lvm2 with
its own locking, loop activation): nothing is corrupted or lost, every call
answers, no LV leaks, and nothing is left running (the ``lvmo`` fixture)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from lvmo_helpers import BLOCK, K4, LvmoSR, MiB, pat

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

WORKERS = 4


def _worker(sr: LvmoSR, n: int) -> dict[str, Any]:
    """create, write, snapshot under a writer, clone, destroy, attach."""
    from smcommon import vhd

    rng = random.Random(n)
    keep = sr.create(f"w{n}", 4 * MiB)["vdi"]
    tmp = sr.create(f"w{n}-tmp", 2 * MiB)["vdi"]
    with sr.opened(keep, rw=True, dp=f"writer{n}") as path:
        vhd.write(path, 0, pat(f"w{n}-0"))
        snap = sr.snapshot(keep, name_label=f"w{n}-snap")["vdi"]
        vhd.write(path, BLOCK, pat(f"w{n}-1"))
    clone = sr.clone(keep, name_label=f"w{n}-clone")["vdi"]
    if rng.random() < 0.5:
        sr.ok("VDI.destroy", vdi=snap)
        snap = ""
    sr.ok("VDI.destroy", vdi=tmp)
    sr.attach(clone, f"vm{n}", False)  # a datapath left attached on the clone
    return {"keep": keep, "snap": snap, "clone": clone, "n": n}


def test_parallel_create_snapshot_destroy_attach(lsr: LvmoSR) -> None:
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda n: _worker(lsr, n), range(WORKERS)))
    expect = set()
    for r in results:
        expect |= {r["keep"], r["clone"]} | ({r["snap"]} if r["snap"] else set())
    assert set(lsr.scan()) == expect
    for r in results:
        lsr.ok("VDI.detach", dp=f"vm{r['n']}", vdi=r["clone"])
    lsr.assert_no_leaks()
    for r in results:
        n = r["n"]
        assert lsr.read(r["keep"], [(0, K4), (BLOCK, K4)]) == [pat(f"w{n}-0"), pat(f"w{n}-1")]
        assert lsr.read(r["clone"], [(0, K4), (BLOCK, K4)]) == [pat(f"w{n}-0"), pat(f"w{n}-1")]
        if r["snap"]:
            assert lsr.read(r["snap"], [(0, K4), (BLOCK, K4)]) == [pat(f"w{n}-0"), b"\0" * K4]
