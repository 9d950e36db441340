"""Two hosts (two SM_ROOTs, each with its own mount of the share) on one NFS
SR: what one host does the other sees; concurrent snapshot/clone/destroy from
both leave one consistent tree; one collector at a time; kill -9 of either
host's calls at random instants loses nothing.

The coordination is the SR's locks, on the share (``<sr>/.sm/locks``, fcntl
record locks): the mounts here are development mounts of one exported
directory (this kernel has no NFS client), so the locks meet in the server's
file system as they would through NFS's lock protocols."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ext_helpers import SR, Ext, MiB, SrFactory, parse_response

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

K4 = 4096
SEED = int(os.environ.get("NFS_CRASH_SEED", "0")) or random.randrange(1, 10**6)


def pat(tag: str) -> bytes:
    unit = (tag.encode() + b"-") * 8
    return (unit * (K4 // len(unit) + 1))[:K4]


def on_host(sr: SR, host: Ext) -> SR:
    """Attach ``sr`` on another host; the same SR seen from there."""
    host.ok("SR.attach", sr=sr.uuid, device_config=sr.config)
    mnt = host.root / "run" / "sm" / "sr-mount" / sr.uuid
    return SR(host, sr.uuid, sr.kind, mnt, sr.config, sr.backing)


@pytest.fixture
def shared(factory: SrFactory, host_b: Ext) -> Any:
    a = factory.make()
    b = on_host(a, host_b)
    yield a, b
    host_b.call("SR.detach", sr=a.uuid)


def test_what_one_host_does_the_other_sees(shared: Any) -> None:
    a, b = shared
    with open("/proc/self/mounts") as f:
        targets = {line.split()[1] for line in f}
    assert a.data_dir != b.data_dir and {str(a.data_dir), str(b.data_dir)} <= targets
    v = a.create("from-a", 4 * MiB)
    a.write(v["vdi"], {0: pat("a0")})
    assert set(b.scan()) == {v["vdi"]}
    assert b.read_attached(v["vdi"], [(0, K4)]) == [pat("a0")]
    s = b.snapshot(v["vdi"], name_label="snap-by-b")
    assert a.ok("VDI.stat", vdi=s["vdi"])["name_label"] == "snap-by-b"
    # datapaths are per host: B's attach is not A's
    b.attach(v["vdi"], "vm-b", True)
    a.ok("VDI.attach", dp="vm-a", vdi=v["vdi"], read_write=False)
    a.ok("VDI.detach", dp="vm-a", vdi=v["vdi"])
    b.ok("VDI.detach", dp="vm-b", vdi=v["vdi"])
    # one host detaching leaves the other working
    b.ok("SR.detach")
    assert b.ext.ok("SR.ls") == []
    assert set(a.scan()) == {v["vdi"], s["vdi"]}
    b.ext.ok("SR.attach", sr=a.uuid, device_config=a.config)
    a.assert_consistent()


def test_concurrent_snapshot_clone_destroy_from_both_hosts(shared: Any) -> None:
    a, b = shared
    rng = random.Random(SEED)
    bases = {h: h.create(f"base-{i}", 4 * MiB)["vdi"] for i, h in enumerate((a, b))}

    def work(job: tuple[SR, int]) -> list[str]:
        host, n = job
        base = bases[host]
        made = [host.snapshot(base, name_label=f"s{n}")["vdi"]]
        made.append(host.clone(base, name_label=f"c{n}")["vdi"])
        other = bases[b if host is a else a]
        made.append(host.snapshot(other, name_label=f"x{n}")["vdi"])
        host.ok("VDI.destroy", vdi=made.pop(rng.randrange(3)))
        return made

    jobs = [(h, n) for n in range(3) for h in (a, b)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        kept = [v for made in pool.map(work, jobs) for v in made]
    want = set(kept) | set(bases.values())
    assert set(a.scan()) == want == set(b.scan())
    a.ok("SR.gc")
    a.assert_consistent(after_gc=True)
    b.assert_consistent(after_gc=True)
    print(f"seed={SEED}")


HOLD = """
import sys
from pathlib import Path
from smcommon.engine import locks
with locks.tree_lock(locks.shared_lock_dir(Path(sys.argv[1])), timeout=10):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_one_collector_at_a_time(shared: Any) -> None:
    """Host B's process holds the SR's tree lock (the collector's lock) on
    the share; host A's SR.gc waits for it, then runs.  Host A's own lock
    directory holds no lock of the SR's tree."""
    a, b = shared
    v = a.create("x")
    a.snapshot(v["vdi"])
    hold = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(b.data_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert hold.stdout is not None and hold.stdout.readline().strip() == "held"
        quick = Ext(a.ext.root, plugin=a.ext.plugin, env={**a.ext.env, "SM_LOCK_TIMEOUT": "1"})
        err = quick.err("SR.gc", sr=a.uuid)
        assert err[:2] == ["Backend_error", "LOCK_TIMEOUT"], err
        local = [p.name for p in (a.ext.root / "run" / "sm" / "lock").rglob("*.lock")]
        assert "tree.lock" not in local
    finally:
        assert hold.stdin is not None
        hold.stdin.close()
        hold.wait(timeout=30)
    assert a.ok("SR.gc")
    a.assert_consistent(after_gc=True)


def _popen(host: Ext, method: str, **args: Any) -> subprocess.Popen[bytes]:
    return host.popen(method, **args)


def _finish(p: subprocess.Popen[bytes], kill_at: float) -> Any:
    while time.monotonic() < kill_at and p.poll() is None:
        time.sleep(0.002)
    if p.poll() is None:
        p.kill()
        p.wait()
        out = None
    else:
        assert p.stdout is not None and p.stderr is not None
        out = parse_response(p.wait(), p.stdout.read().decode(), p.stderr.read().decode())
    for f in (p.stdout, p.stderr):
        if f is not None:
            f.close()
    return out


def test_kill_9_of_either_hosts_calls(shared: Any) -> None:
    """Snapshots, clones and destroys from both hosts at once, one host's call
    killed at a random instant each round: the other host's call still
    answers (a killed holder's locks go with it), every acknowledged VDI and
    byte is there, and both hosts see one consistent tree."""
    a, b = shared
    rng = random.Random(SEED)
    main = a.create("main", 4 * MiB)["vdi"]
    a.write(main, {0: pat("main")})
    t0 = time.monotonic()
    b.snapshot(main)
    d = time.monotonic() - t0
    acked: set[str] = set()
    doomed_vdis: list[str] = []
    for i in range(6):
        victim, other = (a, b) if rng.random() < 0.5 else (b, a)
        method = rng.choice(["VDI.snapshot", "VDI.clone", "VDI.destroy"])
        if method == "VDI.destroy":
            target = a.create(f"doomed{i}")["vdi"]
            doomed_vdis.append(target)
            pv = _popen(victim.ext, method, sr=a.uuid, vdi=target)
        else:
            pv = _popen(victim.ext, method, sr=a.uuid, vdi_info={"vdi": main})
        po = _popen(other.ext, "VDI.snapshot", sr=a.uuid, vdi_info={"vdi": main})
        r = _finish(pv, time.monotonic() + rng.uniform(0.2 * d, 1.5 * d))
        if r is not None:
            assert r.ok, r.describe()
            if isinstance(r.value, dict):
                acked.add(r.value["vdi"])
        r2 = _finish(po, time.monotonic() + 120)
        assert r2 is not None and r2.ok, r2.describe() if r2 else "other host's call hung"
        acked.add(r2.value["vdi"])
    for h in (a, b):
        scan = h.scan()
        assert acked <= set(scan), f"acknowledged VDIs lost: {acked - set(scan)}"
        assert h.read(main, [(0, K4)]) == [pat("main")]
    b.ok("SR.gc")
    a.assert_consistent(after_gc=True)
    b.assert_consistent(after_gc=True)
    for v in acked:
        assert a.read(v, [(0, K4)]) == [pat("main")]
    print(f"seed={SEED} call={d:.3f}s acknowledged={len(acked)}")


def test_sr_lock_files_live_on_the_share(shared: Any) -> None:
    a, _ = shared
    v = a.create("x")
    a.snapshot(v["vdi"])
    assert a.backing is not None
    on_share = sorted(p.relative_to(a.backing).as_posix()
                      for p in (a.backing / ".sm" / "locks").rglob("*.lock"))  # fmt: skip
    on_share = [n.removeprefix(".sm/locks/") for n in on_share]
    assert "tree.lock" in on_share and f"vdi/{v['vdi']}.lock" in on_share, on_share
