"""kill -9 of EXTSR at random instants of VDI.snapshot, VDI.clone, VDI.destroy
and SR.gc; afterwards a further call and SR.gc leave the SR consistent and no
acknowledged data is lost.

"Acknowledged" means: a vhd.write that returned (it fsyncs), or a call whose
response was read before the kill.  The random delays are drawn around the
measured duration of the same call on this machine, so most kills land
inside the engine's work rather than in the interpreter's start-up.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest
from ext_helpers import BLOCK, SR, Ext, MiB, Reply, SrFactory, parse_response

pytestmark = [pytest.mark.integration, pytest.mark.slow]

K4 = 4096
RUNS = int(os.environ.get("EXT_CRASH_RUNS", "10"))
SEED = int(os.environ.get("EXT_CRASH_SEED", "0")) or random.randrange(1, 10**6)


def pat(tag: str) -> bytes:
    unit = (tag.encode() + b"-") * 8
    return (unit * (K4 // len(unit) + 1))[:K4]


def call_and_maybe_kill(
    ext: Ext, delay: float, method: str, **args: Any
) -> Reply | None:
    """Run one call; SIGKILL it after ``delay`` seconds unless it has answered."""
    p = ext.popen(method, **args)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.002)
    if p.poll() is None:
        p.kill()
        p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
        return None
    assert p.stdout is not None and p.stderr is not None
    out, err = p.stdout.read(), p.stderr.read()
    p.stdout.close()
    p.stderr.close()
    return parse_response(p.wait(), out.decode(), err.decode())


def duration(ext: Ext, method: str, **args: Any) -> float:
    t0 = time.monotonic()
    ext.ok(method, **args)
    return time.monotonic() - t0


class Vm:
    """A VM holding main's image path from VDI.attach, writing through it."""

    def __init__(self, sr: SR, vdi: str) -> None:
        self.sr = sr
        self.vdi = vdi
        self.path = sr.attach(vdi, "vm", True)
        sr.ok("VDI.activate", dp="vm", vdi=vdi)
        self.want: dict[int, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        from smcommon import vhd

        vhd.write(self.path, off, data)  # fsync'd: acknowledged from here on
        self.want[off] = data

    def stop(self) -> None:
        self.sr.ok("VDI.deactivate", dp="vm", vdi=self.vdi)
        self.sr.ok("VDI.detach", dp="vm", vdi=self.vdi)


def check_after_crashes(sr: SR, vm: Vm, acked: dict[str, bytes]) -> None:
    """A further call, then SR.gc, then every invariant; no acknowledged byte lost."""
    sr.scan()
    vm.stop()
    sr.ok("SR.gc")
    scan = sr.assert_consistent(after_gc=True)
    assert vm.vdi in scan
    offs = sorted(vm.want)
    got = sr.read(vm.vdi, [(o, K4) for o in offs])
    lost = [o for o, g in zip(offs, got, strict=True) if g != vm.want[o]]
    assert not lost, f"acknowledged writes lost at offsets {lost}"
    for vdi, block0 in acked.items():
        assert vdi in scan, f"acknowledged VDI {vdi} lost"
        assert sr.read(vdi, [(0, K4)]) == [block0], f"data of {vdi} lost"


def kill_loop(sr: SR, vm: Vm, method: str, rng: random.Random) -> dict[str, bytes]:
    """RUNS times: a VM write, then ``method`` on the VM's VDI, killed at random."""
    d = duration(sr.ext, method, sr=sr.uuid, vdi_info={"vdi": vm.vdi})
    acked: dict[str, bytes] = {}
    for i in range(RUNS):
        vm.write((i % 4) * BLOCK + (i // 4 + 1) * K4, pat(f"r{i}"))
        r = call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.3 * d, 1.3 * d),
            method,
            sr=sr.uuid,
            vdi_info={"vdi": vm.vdi},
        )
        if r is not None:
            assert r.ok, r.describe()
            acked[r.value["vdi"]] = vm.want[0]
    print(f"{method}: seed={SEED} runs={RUNS} call={d:.3f}s acknowledged={len(acked)}")
    return acked


@pytest.mark.parametrize("method", ["VDI.snapshot", "VDI.clone"])
def test_kill_during_snapshot_and_clone(sr: SR, method: str) -> None:
    rng = random.Random(f"{SEED}-{method}")
    vm = Vm(sr, sr.create("main", 8 * MiB)["vdi"])
    vm.write(0, pat("m0"))
    acked = kill_loop(sr, vm, method, rng)
    # after the crashes the SR takes ordinary work
    s = sr.snapshot(vm.vdi)["vdi"]
    c = sr.clone(s)["vdi"]
    sr.ok("VDI.destroy", vdi=s)
    acked[c] = vm.want[0]
    check_after_crashes(sr, vm, acked)


def test_kill_during_destroy_and_gc(sr: SR) -> None:
    rng = random.Random(f"{SEED}-destroy")
    vm = Vm(sr, sr.create("main", 8 * MiB)["vdi"])
    vm.write(0, pat("d0"))
    keep = sr.snapshot(vm.vdi)["vdi"]  # acknowledged: must survive everything
    acked = {keep: vm.want[0]}
    s = sr.snapshot(vm.vdi)["vdi"]
    d_destroy = duration(sr.ext, "VDI.destroy", sr=sr.uuid, vdi=s)
    d_gc = duration(sr.ext, "SR.gc", sr=sr.uuid)
    gone: list[str] = []
    for i in range(RUNS):
        vm.write(BLOCK + i * K4, pat(f"x{i}"))
        victim = sr.snapshot(vm.vdi)["vdi"]
        r = call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.3 * d_destroy, 1.1 * d_destroy),
            "VDI.destroy",
            sr=sr.uuid,
            vdi=victim,
        )
        if r is not None:
            assert r.ok, r.describe()
            gone.append(victim)
        r = call_and_maybe_kill(
            sr.ext, rng.uniform(0.3 * d_gc, 1.1 * d_gc), "SR.gc", sr=sr.uuid
        )
        if r is not None:
            assert r.ok, r.describe()
    check_after_crashes(sr, vm, acked)
    scan = sr.scan()
    for v in gone:
        assert v not in scan, f"destroyed (acknowledged) VDI {v} came back"
    print(f"seed={SEED} runs={RUNS} destroy={d_destroy:.3f}s gc={d_gc:.3f}s")


def test_kill_during_compose_epoch_and_copy(make_sr: SrFactory) -> None:
    """Fewer runs each: kill -9 in VDI.compose, VDI.epoch_begin,
    VDI.set_persistent and VDI.copy; acknowledged data of every VDI stays."""
    sr, dest = make_sr.make(), make_sr.make()
    rng = random.Random(f"{SEED}-misc")
    runs = max(2, RUNS // 5)
    base = sr.create("base", 4 * MiB)["vdi"]
    sr.write(base, {0: pat("b0")})
    np = sr.create("np", 4 * MiB)["vdi"]
    sr.write(np, {0: pat("np0")})
    sr.ok("VDI.set_persistent", vdi=np, persistent=False)
    d = duration(sr.ext, "VDI.epoch_begin", sr=sr.uuid, vdi=np)
    for _ in range(runs):
        sr.write(np, {K4: pat("epoch-write")})
        call_and_maybe_kill(
            sr.ext, rng.uniform(0.3 * d, 1.3 * d), "VDI.epoch_begin", sr=sr.uuid, vdi=np
        )
    for _ in range(1):
        top = sr.clone(base)["vdi"]
        sr.write(top, {BLOCK: pat("top1")})
        other = sr.create("other", 4 * MiB)["vdi"]
        sr.write(other, {0: pat("o0")})
        r = call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.1, 0.6),
            "VDI.compose",
            sr=sr.uuid,
            vdi1=other,
            vdi2=top,
        )
        got = sr.read(top, [(0, K4), (BLOCK, K4)])
        # before or after the compose, never a mix that loses top's own data
        assert got[1] == pat("top1")
        if r is not None and r.ok:
            assert got[0] == pat("o0")
        else:
            assert got[0] in (pat("b0"), pat("o0"))
        assert sr.read(other, [(0, K4)]) == [pat("o0")]
    for _ in range(runs):
        call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.1, 0.8),
            "VDI.copy",
            sr=sr.uuid,
            vdi=base,
            url="",
            dest=dest.uuid,
        )
        call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.1, 0.5),
            "VDI.set_persistent",
            sr=sr.uuid,
            vdi=np,
            persistent=rng.random() < 0.5,
        )
    sr.ok("VDI.set_persistent", vdi=np, persistent=False)
    sr.ok("VDI.epoch_begin", vdi=np)
    assert sr.read(np, [(0, K4)]) == [pat("np0")]
    for s in (sr, dest):
        s.ok("SR.gc")
        s.assert_consistent(after_gc=True)
    assert sr.read(base, [(0, K4)]) == [pat("b0")]
    for v in dest.scan():
        assert dest.read(v, [(0, K4)]) == [pat("b0")], "a copy shows up half made"


@pytest.mark.sr_types("ext", "nfs")  # lvmoiscsi: VHD-<v>.new LVs, test_lvmoiscsi_crash.py
def test_leftover_temp_of_a_killed_fork_does_not_block_the_next(sr: SR) -> None:
    """Deterministic form of a state the random kills reach: a process killed
    while writing a VDI's new leaf under its temporary name (FileStore's
    ``<leaf>.vhd.new``).  The next snapshot must not fail on it."""
    from smcommon import vhd

    v = sr.create("v", 4 * MiB)["vdi"]
    leaf = sr.leaf_path(v)
    assert leaf.endswith(".vhd")
    vhd.snapshot(leaf, leaf[: -len(".vhd")] + ".vhd.new")
    s = sr.snapshot(v)["vdi"]
    c = sr.clone(v)["vdi"]
    assert {v, s, c} <= set(sr.scan())
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
