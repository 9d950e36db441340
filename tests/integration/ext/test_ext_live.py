"""Chains of running VMs stay short: rolling snapshots under a live writer.

A writer process modelled on tapdisk (``tapwriter.py``: the chain opened
once, the leaf read-write and locked, the parents read-only, writes and
verified reads without pause) runs on an attached, activated VDI while
cycles of VDI.snapshot + VDI.destroy of the previous snapshot run.  The
writer is paused only around each VDI.snapshot, as the reference toolstack
pauses tapdisk to snapshot; the collector process shortens the chain while
it writes.  Checked: the chain is never more than 3 deep, the writer never
reads a wrong byte, and each snapshot equals the disk at its time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ext_helpers import SR, MiB

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.sr_types("ext")]

HERE = Path(__file__).resolve().parent
CYCLES = int(os.environ.get("EXT_LIVE_CYCLES", "100"))
REGION = 16 * MiB
TIMING = bool(os.environ.get("EXT_LIVE_TIMING"))
PIECE = 4096


def piece(offset: int, version: int) -> bytes:
    sys.path.insert(0, str(HERE))
    from tapwriter import piece as p

    return p(offset, version)


class TapWriter:
    def __init__(self, sr: SR, leaf: str, vdi: str, seed: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "tapwriter.py"),
                leaf,
                str(sr.ext.root),
                sr.uuid,
                vdi,
                str(REGION),
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=sr.ext.env,
        )

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the writer died (rc {self.proc.poll()})"
        doc = json.loads(answer)
        assert isinstance(doc, dict)
        return doc

    def pause(self, model_file: Path) -> dict[int, int]:
        doc = self.ask(f"pause {model_file}")
        assert doc.get("paused") and not doc.get("errors"), doc
        return {int(k): v for k, v in json.loads(model_file.read_text()).items()}

    def resume(self) -> None:
        doc = self.ask("resume")
        assert doc.get("resumed"), doc

    def stop(self) -> dict[str, Any]:
        doc = self.ask("stop")
        self.proc.wait(30)
        return doc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def depth(leaf: str) -> int:
    """The chain's length, read without any image lock (the writer holds them)."""
    from smcommon.vhd.live import peek

    n, path = 1, leaf
    while True:
        parent = peek(path).parent
        if parent is None:
            return n
        n, path = n + 1, parent


def expected(model: dict[int, int], at: int, n: int) -> bytes:
    return b"".join(piece(off, model.get(off, 0)) for off in range(at, at + n, PIECE))


def check_snapshot(sr: SR, vdi: str, model: dict[int, int]) -> None:
    """The snapshot's whole written region equals the model at its time."""
    from smcommon.vhd.image import open_image

    with open_image(sr.leaf_path(vdi)) as img:
        for at in range(0, REGION, 2 * MiB):
            got = img.read(at, 2 * MiB)
            want = expected(model, at, 2 * MiB)
            if got != want:
                bad = [
                    off
                    for off in range(at, at + 2 * MiB, PIECE)
                    if got[off - at : off - at + PIECE]
                    != want[off - at : off - at + PIECE]
                ]
                raise AssertionError(f"snapshot {vdi} differs at offsets {bad[:10]}")


@pytest.mark.timeout(3600)
def test_rolling_snapshots_of_a_running_vm(sr: SR, tmp_path: Path) -> None:
    # the writer holds the leaf's lock all along: each re-link under it is
    # live whatever the collector's wait, so wait 0.1 s, not 1 s, per cycle
    sr.ext.env["SM_LIVE_LOCK_WAIT"] = "0.1"
    v = sr.create("vm-disk", 64 * MiB)["vdi"]
    leaf = sr.attach(v, "vm", True)
    sr.ok("VDI.activate", dp="vm", vdi=v)
    writer = TapWriter(sr, leaf, v, seed=9)
    depths: list[int] = []
    prev: tuple[str, dict[int, int]] | None = None
    try:
        for i in range(CYCLES):
            t0 = time.monotonic()
            model = writer.pause(tmp_path / f"model-{i}.json")
            snap = sr.snapshot(v)["vdi"]
            writer.resume()
            t1 = time.monotonic()
            depths.append(depth(leaf))
            if prev is not None:
                # the previous snapshot still equals the disk at its time, now
                # that the collector has merged what lay under it
                check_snapshot(sr, *prev)
                t2 = time.monotonic()
                sr.ok("VDI.destroy", vdi=prev[0])
            else:
                t2 = time.monotonic()
            t3 = time.monotonic()
            prev = (snap, model)
            sr.wait_gc()
            t4 = time.monotonic()
            depths.append(depth(leaf))
            if TIMING:
                print(
                    f"cycle {i}: snapshot {t1 - t0:.2f}s check {t2 - t1:.2f}s "
                    f"destroy {t3 - t2:.2f}s wait {t4 - t3:.2f}s"
                )
        assert prev is not None
        check_snapshot(sr, *prev)
        final = writer.stop()
    finally:
        writer.kill()
    print(
        f"{CYCLES} cycles: depths {sorted(set(depths))}, writer {final['writes']} "
        f"writes, {final['reads']} verified reads"
    )
    assert not final["errors"], final["errors"]
    assert final["nwrong"] == 0, f"wrong bytes read: {final['wrong']}"
    assert final["writes"] > CYCLES
    assert max(depths) <= 3, depths
    # the chain was shortened while the writer ran: without the collector
    # it would be CYCLES + 1 deep by now
    assert depths[-1] <= 2, depths
    sr.ok("VDI.deactivate", dp="vm", vdi=v)
    sr.ok("VDI.detach", dp="vm", vdi=v)
    model = {int(k): ver for k, ver in final["model"].items()}
    check_snapshot(sr, v, model)
    sr.ok("VDI.destroy", vdi=prev[0])
    sr.ok("SR.gc")
    sr.assert_consistent(after_gc=True)
    assert depth(sr.leaf_path(v)) == 1
    check_snapshot(sr, v, model)
