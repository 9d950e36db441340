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
import urllib.parse
from typing import Any

import pytest

from ext_helpers import BLOCK, SR, Ext, MiB, Reply, parse_response

pytestmark = [pytest.mark.integration, pytest.mark.slow]

K4 = 4096
RUNS = int(os.environ.get("EXT_CRASH_RUNS", "12"))
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
    out, err = p.communicate()
    return parse_response(p.returncode, out.decode(), err.decode())


def duration(ext: Ext, method: str, **args: Any) -> float:
    t0 = time.monotonic()
    ext.ok(method, **args)
    return time.monotonic() - t0


def read_by_url(sr: SR, vdi: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    from smcommon import vhd

    url = sr.ok("VDI.get_url", vdi=vdi)
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    return [vhd.read(path, off, n) for off, n in ranges]


def check_after_crashes(
    sr: SR, main: str, want: dict[int, bytes], acked: dict[str, bytes]
) -> None:
    """A further call, then SR.gc, then every invariant."""
    sr.scan()
    sr.ok("SR.gc")
    scan = sr.assert_consistent(after_gc=True)
    assert main in scan
    offs = sorted(want)
    assert read_by_url(sr, main, [(o, K4) for o in offs]) == [want[o] for o in offs]
    for vdi, block0 in acked.items():
        assert vdi in scan, f"acknowledged VDI {vdi} lost"
        assert read_by_url(sr, vdi, [(0, K4)]) == [block0], f"data of {vdi} lost"


@pytest.mark.parametrize("method", ["VDI.snapshot", "VDI.clone"])
def test_kill_during_snapshot_and_clone(path_sr: SR, method: str) -> None:
    sr = path_sr
    rng = random.Random(f"{SEED}-{method}")
    main = sr.create("main", 8 * MiB)["vdi"]
    want = {0: pat("m0")}
    sr.write(main, want)
    d = duration(sr.ext, method, sr=sr.uuid, vdi_info={"vdi": main})
    acked: dict[str, bytes] = {}
    for i in range(RUNS):
        off = (i % 4) * BLOCK + (i // 4 + 1) * K4
        want[off] = pat(f"r{i}")
        sr.write(main, {off: want[off]})
        r = call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.3 * d, 1.1 * d),
            method,
            sr=sr.uuid,
            vdi_info={"vdi": main},
        )
        if r is not None:
            assert r.ok, r.describe()
            acked[r.value["vdi"]] = want[0]
    check_after_crashes(sr, main, want, acked)
    print(f"seed={SEED} runs={RUNS} call={d:.3f}s acknowledged={len(acked)}")


def test_kill_during_destroy_and_gc(path_sr: SR) -> None:
    sr = path_sr
    rng = random.Random(f"{SEED}-destroy")
    main = sr.create("main", 8 * MiB)["vdi"]
    want = {0: pat("d0")}
    sr.write(main, want)
    keep = sr.snapshot(main)["vdi"]  # acknowledged: must survive everything
    acked = {keep: want[0]}
    s = sr.snapshot(main)["vdi"]
    d_destroy = duration(sr.ext, "VDI.destroy", sr=sr.uuid, vdi=s)
    d_gc = duration(sr.ext, "SR.gc", sr=sr.uuid)
    gone: list[str] = []
    for i in range(RUNS):
        off = BLOCK + i * K4
        want[off] = pat(f"x{i}")
        sr.write(main, {off: want[off]})
        victim = sr.snapshot(main)["vdi"]
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
    check_after_crashes(sr, main, want, acked)
    scan = sr.scan()
    for v in gone:
        assert v not in scan, f"destroyed (acknowledged) VDI {v} came back"
    print(f"seed={SEED} runs={RUNS} destroy={d_destroy:.3f}s gc={d_gc:.3f}s")


def test_kill_during_snapshot_of_a_tree_then_more_work(path_sr: SR) -> None:
    """After crashes the SR still takes ordinary work: snapshot, clone, destroy."""
    sr = path_sr
    rng = random.Random(f"{SEED}-tree")
    main = sr.create("main", 4 * MiB)["vdi"]
    want = {0: pat("t0")}
    sr.write(main, want)
    d = duration(sr.ext, "VDI.snapshot", sr=sr.uuid, vdi_info={"vdi": main})
    for _ in range(max(3, RUNS // 3)):
        call_and_maybe_kill(
            sr.ext,
            rng.uniform(0.3 * d, 1.1 * d),
            "VDI.snapshot",
            sr=sr.uuid,
            vdi_info={"vdi": main},
        )
    s = sr.snapshot(main)["vdi"]
    c = sr.clone(s)["vdi"]
    sr.ok("VDI.destroy", vdi=s)
    check_after_crashes(sr, main, want, {c: want[0]})
