"""kill -9 of LVMoISCSISR at random instants of what only lvmoiscsi journals:
VDI.create (a journaled new LV) and VDI.epoch_begin (a ``.new`` replacement
swapped in), on a real tgtd LUN with real lvm2 (userspace initiator, loop
activation); afterwards a further call and SR.gc leave the SR consistent, no
acknowledged byte is lost, and the LVs are exactly the MGT volume and the
VDIs' chains (no leaked volume, no half-made one).  Kills during snapshot,
clone, destroy, the collector, compose and copy run on lvmoiscsi in
tests/integration/ext/test_ext_crash.py (``[lvmoiscsi]``).

"Acknowledged" means: a vhd.write that returned (it fsyncs), or a call whose
response was read before the kill.  Delays are drawn around the measured
duration of the same call, so kills land inside the work (lvm commands,
activations, journal steps), not only in the interpreter's start-up.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest
from lvmo_helpers import K4, LvmoSR, MiB, pat
from test_ext_crash import call_and_maybe_kill  # the suite's kill helper

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

RUNS = int(os.environ.get("LVMO_CRASH_RUNS", "6"))
SEED = int(os.environ.get("LVMO_CRASH_SEED", "0")) or random.randrange(1, 10**6)


def duration(sr: LvmoSR, method: str, **args: Any) -> float:
    t0 = time.monotonic()
    sr.ok(method, **args)
    return time.monotonic() - t0


def check(sr: LvmoSR, acked: dict[str, bytes]) -> None:
    sr.scan()
    sr.assert_no_leaks()
    scan = sr.scan()
    for vdi, block0 in acked.items():
        assert vdi in scan, f"acknowledged VDI {vdi} lost (seed {SEED})"
        assert sr.read(vdi, [(0, K4)]) == [block0], f"data of {vdi} lost (seed {SEED})"


def test_kill_during_create_and_epoch_begin(lsr: LvmoSR) -> None:
    rng = random.Random(f"{SEED}-create")
    d = duration(lsr, "VDI.create", vdi_info={"name_label": "m", "virtual_size": str(4 * MiB)})
    acked: dict[str, bytes] = {}
    for i in range(RUNS):
        r = call_and_maybe_kill(lsr.ext, rng.uniform(0.2 * d, 1.2 * d), "VDI.create",
                                sr=lsr.uuid, vdi_info={"name_label": f"c{i}",
                                                       "virtual_size": str(4 * MiB)})
        if r is not None:
            assert r.ok, r.describe()
            acked[r.value["vdi"]] = b"\0" * K4
    np = lsr.create("np", 8 * MiB)["vdi"]
    lsr.write(np, {0: pat("frozen")})
    lsr.ok("VDI.set_persistent", vdi=np, persistent=False)
    d = duration(lsr, "VDI.epoch_begin", vdi=np)
    for _ in range(RUNS):
        lsr.write(np, {0: pat("epoch")})
        call_and_maybe_kill(lsr.ext, rng.uniform(0.2 * d, 1.2 * d), "VDI.epoch_begin",
                            sr=lsr.uuid, vdi=np)
    lsr.ok("VDI.epoch_begin", vdi=np)
    acked[np] = pat("frozen")
    check(lsr, acked)
