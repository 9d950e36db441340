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
    a, b = make_sr.make(), make_sr.make()

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


def test_copy_takes_the_sr_lock_before_the_vdi_lock(path_sr: SR) -> None:
    """The lock order of snapshot and clone (SR, then VDI) holds for VDI.copy
    too.  With the opposite order a copy took the VDI lock and then waited on
    the SR lock that a snapshot held while waiting on that VDI lock: a deadlock
    ended only by LOCK_TIMEOUT.  Here the test holds the SR lock itself while a
    copy starts; the VDI lock must stay free until the SR lock is released."""
    import subprocess
    import time

    from smcommon.engine import locks

    sr = path_sr
    vdi = sr.create("src", 4 * MiB)["vdi"]
    request = sr.ext.request(
        "VDI.copy",
        {"dbg": "t", "sr": sr.uuid, "vdi": vdi, "url": "local", "dest": sr.uuid},
    )
    # the SR's locks live in the SR (shared by every host attaching it)
    with locks.tree_lock(locks.shared_lock_dir(sr.data_dir), timeout=10):
        proc = subprocess.Popen(
            sr.ext.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=sr.ext.env, text=True,
        )  # fmt: skip
        proc.stdin.write(request)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        time.sleep(1.5)  # the copy is now waiting for the SR lock we hold
        assert proc.poll() is None
        with locks.vdi_lock(locks.shared_lock_dir(sr.data_dir), vdi, timeout=0.5):
            pass  # free: the copy did not take it before the SR lock
    out = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.wait(timeout=60) == 0
    assert "<value>Success</value>" in out, out


def test_copies_and_snapshots_of_one_vdi_in_parallel(path_sr: SR) -> None:
    """Copies and snapshots of one VDI at once all answer with new VDIs and
    leave the SR consistent (the lock order itself is proven above)."""
    sr = path_sr
    vdi = sr.create("src", 4 * MiB)["vdi"]

    def copy(_: int) -> Any:
        return sr.ok("VDI.copy", vdi=vdi, url="local", dest=sr.uuid)

    def snap(n: int) -> Any:
        return sr.snapshot(vdi, name_label=f"s{n}")["vdi"]

    jobs = [copy, snap] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        made = list(pool.map(lambda j: j[1](j[0]), enumerate(jobs)))
    assert len(set(made)) == len(jobs)  # every call answered with a new VDI
    assert set(made) | {vdi} == set(sr.scan())
    sr.assert_consistent()
