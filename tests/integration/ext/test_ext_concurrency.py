"""Many EXTSR processes at once on one SR: nothing is corrupted or lost, every
call answers, and nothing is left running (the ``ext`` fixture checks that
with psutil)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ext_helpers import BLOCK, SR, MiB, vinfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

K4 = 4096
WORKERS = 8


def pat(tag: str) -> bytes:
    unit = (tag.encode() + b"-") * 8
    return (unit * (K4 // len(unit) + 1))[:K4]


def _worker(sr: SR, n: int) -> dict[str, Any]:
    """create, write, snapshot, clone, destroy, attach: what should remain."""
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
    # a datapath left attached on the clone
    sr.attach(clone, f"vm{n}", False)
    return {"keep": keep, "snap": snap, "clone": clone, "n": n}


def test_parallel_create_snapshot_destroy_attach(path_sr: SR) -> None:
    sr = path_sr
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda n: _worker(sr, n), range(WORKERS)))
    expect = set()
    for r in results:
        expect |= {r["keep"], r["clone"]} | ({r["snap"]} if r["snap"] else set())
    assert set(sr.scan()) == expect
    for r in results:
        sr.ok("VDI.detach", dp=f"vm{r['n']}", vdi=r["clone"])
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
    for r in results:
        n = r["n"]
        assert sr.read(r["keep"], [(0, K4), (BLOCK, K4)]) == [
            pat(f"w{n}-0"),
            pat(f"w{n}-1"),
        ]
        assert sr.read(r["clone"], [(0, K4), (BLOCK, K4)]) == [
            pat(f"w{n}-0"),
            pat(f"w{n}-1"),
        ]
        if r["snap"]:
            assert sr.read(r["snap"], [(0, K4), (BLOCK, K4)]) == [
                pat(f"w{n}-0"),
                b"\0" * K4,
            ]


def test_parallel_datapaths_on_one_vdi(path_sr: SR) -> None:
    """Per-VDI locking: WORKERS datapaths attach/activate/deactivate/detach the same
    VDI at once; afterwards every datapath is Detached and the VDI is free."""
    sr = path_sr
    v = sr.create("shared", 2 * MiB)["vdi"]

    def cycle(n: int) -> None:
        dp = f"dp{n}"
        sr.attach(v, dp, n % 2 == 0)
        sr.ok("VDI.activate", dp=dp, vdi=v)
        sr.ok("VDI.deactivate", dp=dp, vdi=v)
        sr.ok("VDI.detach", dp=dp, vdi=v)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(cycle, range(WORKERS)))
    # nothing recorded: activate without attach is illegal for every dp
    for n in (0, 1, WORKERS - 1):
        err = sr.err("VDI.activate", dp=f"dp{n}", vdi=v)
        assert err[:2] == ["Illegal_transition", "Detached"], err
    sr.ok("VDI.destroy", vdi=v)
    assert sr.scan() == {}


def test_parallel_creates_in_two_srs_and_scans(make_sr: Any) -> None:
    a, b = make_sr.make("path"), make_sr.make("path")

    def job(n: int) -> str:
        target = a if n % 2 else b
        if n % 3 == 0:
            target.scan()
        return target.ok("VDI.create", vdi_info=vinfo(f"p{n}", MiB))["vdi"]

    with ThreadPoolExecutor(WORKERS) as pool:
        made = list(pool.map(job, range(2 * WORKERS)))
    assert len(set(made)) == len(made)
    assert set(a.scan()) | set(b.scan()) == set(made)
    assert len(a.scan()) == WORKERS
    a.assert_consistent()
    b.assert_consistent()
