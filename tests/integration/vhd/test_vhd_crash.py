"""Crash safety of ``smcommon.vhd``: writers and coalesce killed with SIGKILL.

A writer subprocess calls ``smcommon.vhd.write`` in a loop and prints
``W <off> <len> <seed>`` before and ``ACK <off> <len> <seed>`` after each write
(flushing each line).  It is SIGKILLed after a random delay; the image must then
pass ``check`` and hold every acknowledged write; the one write in flight may
be there, absent, or (per byte) partly there.  Runs continue on the same image,
so each run also starts from the state the previous crash left.  Writes go both
to fresh blocks (allocation: BAT, footer) and into allocated ones.

Coalesce: a child with many allocated blocks is coalesced into its parent in a
subprocess killed at random points of a measured full run; then both images
must pass ``check``, the child must still read as before, and re-running
coalesce must leave the parent holding exactly the merged content.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from smcommon import vhd

import vhdproof as vp

pytestmark = pytest.mark.integration

MIB = vp.MIB
SIZE = 24 * MIB

WRITER = r"""
import random, sys
import smcommon.vhd as vhd
path, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
print("READY", flush=True)
while True:
    if rng.random() < 0.5:   # into the pre-filled (allocated) first third
        length = rng.choice([1, 300, 512, 4096, 70000, 600000])
        off = rng.randrange(0, size // 3 - length)
    else:                    # anywhere: often a fresh block, sometimes straddling
        length = rng.choice([511, 4096, 65536, 1 << 20, 2 * (1 << 20) + 1])
        off = rng.randrange(0, size - length)
    s = rng.getrandbits(32)
    print(f"W {off} {length} {s}", flush=True)
    data = random.Random(s).randbytes(length)
    vhd.write(path, off, data)
    print(f"ACK {off} {length} {s}", flush=True)
"""

COALESCER = r"""
import os, sys, time
import smcommon.vhd as vhd
slow = float(sys.argv[2])
if slow:  # a slowed copy: every large write of the library sleeps first
    for name in ("pwrite", "write", "pwritev"):
        real = getattr(os, name, None)
        if real is None:
            continue
        def wrapped(*a, _real=real, **k):
            time.sleep(slow)
            return _real(*a, **k)
        setattr(os, name, wrapped)
print("READY", flush=True)
print("DONE", vhd.coalesce(sys.argv[1]), flush=True)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    # stderr to a file: with two pipes, communicate() would read the raw fds and
    # lose what readline() already buffered from stdout
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _finish
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    proc.errfile = err  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """Everything the process printed (including what readline buffered), and stderr."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait(timeout=timeout)
    errfile = proc.errfile  # type: ignore[attr-defined]
    errfile.seek(0)
    err = errfile.read().decode(errors="replace")
    errfile.close()
    return out, err


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        _, err = _finish(proc)
        raise AssertionError(f"subprocess did not start: {line!r} {err[-2000:]}")


def _kill(proc: subprocess.Popen[str]) -> tuple[str, str]:
    os.kill(proc.pid, signal.SIGKILL)
    out, err = _finish(proc)
    assert proc.returncode == -signal.SIGKILL, (
        f"writer died by itself (rc {proc.returncode}): {err[-2000:]}"
    )
    return out, err


def _verify(path: str, model: bytearray, inflight: tuple[int, bytes] | None) -> None:
    got = vhd.read(path, 0, len(model))
    if inflight is None:
        assert got == model, "an acknowledged write is missing or damaged"
        return
    off, data = inflight
    end = off + len(data)
    assert got[:off] == model[:off] and got[end:] == model[end:], (
        "bytes outside the write in flight changed"
    )
    region = got[off:end]
    if region in (data, bytes(model[off:end])):
        return
    old = model[off:end]
    bad = [i for i in range(len(region)) if region[i] not in (old[i], data[i])]
    assert not bad, (
        f"in-flight write at {off}+{len(data)}: {len(bad)} bytes are neither old nor new (first {off + bad[0]})"
    )


def _crash_runs(path: str, model: bytearray, runs: int, seed: int) -> int:
    rng = random.Random(seed)
    acked_total = 0
    mid_write = 0
    for run in range(runs):
        proc = _spawn(WRITER, path, str(seed * 1000 + run), str(len(model)))
        _wait_ready(proc)
        time.sleep(rng.choice([0.0, 0.002, 0.01]) + rng.random() * 0.25)
        out, _ = _kill(proc)
        inflight = None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue  # the last line may be cut by the kill
            tag, off, length, s = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
            if tag == "W":
                inflight = (off, random.Random(s).randbytes(length))
            elif tag == "ACK":
                assert inflight is not None and inflight[0] == off
                vp.apply(model, off, inflight[1])
                inflight = None
                acked_total += 1
        problems = vhd.check(path)
        assert problems == [], f"run {run}: check after SIGKILL: {problems}"
        _verify(path, model, inflight)
        mid_write += inflight is not None
        if inflight is not None:  # settle the model to what is there now
            off, data = inflight
            model[off : off + len(data)] = vhd.read(path, off, len(data))
    assert mid_write >= runs // 2, (
        f"only {mid_write} of {runs} kills landed during a write"
    )
    return acked_total


def _prefill(path: str, model: bytearray) -> None:
    data = vp.pattern(99, SIZE // 3)
    vhd.write(path, 0, data)
    vp.apply(model, 0, data)


def test_writer_killed_at_random_points_dynamic(sr_dir: Path) -> None:
    img = str(sr_dir / "dyn.vhd")
    vhd.create(img, SIZE)
    model = bytearray(SIZE)
    _prefill(img, model)
    acked = _crash_runs(img, model, runs=16, seed=1)
    assert acked > 16, "the writer hardly wrote anything: the test proved little"


def test_writer_killed_at_random_points_differencing(sr_dir: Path) -> None:
    base = str(sr_dir / "base.vhd")
    vhd.create(base, SIZE)
    model = bytearray(SIZE)
    _prefill(base, model)
    data = vp.pattern(5, 5 * MIB)
    vhd.write(base, 12 * MIB, data)
    vp.apply(model, 12 * MIB, data)
    leaf = str(sr_dir / "leaf.vhd")
    vhd.snapshot(base, leaf)
    acked = _crash_runs(leaf, model, runs=14, seed=2)
    assert acked > 14
    assert vhd.check(base) == []


def _make_coalesce_pair(d: Path) -> tuple[str, str, bytes, bytes]:
    """A 64 MiB parent with data, and a child holding ~40 MiB in 24 blocks."""
    size = 64 * MIB
    parent, child = str(d / "parent.vhd"), str(d / "child.vhd")
    vhd.create(parent, size)
    rng = random.Random(4)
    for i in range(0, size, 6 * MIB):
        vhd.write(parent, i + rng.randrange(0, MIB), vp.pattern(i, MIB + 777))
    before = vhd.read(parent, 0, size)
    vhd.snapshot(parent, child)
    for b in range(32):
        if b % 4 == 3:
            continue
        off = b * vp.BLOCK + rng.randrange(0, 4096)
        length = vp.BLOCK - rng.randrange(0, 300_000)
        vhd.write(child, off, vp.pattern(b, min(length, size - off)))
    vhd.write(child, 5, b"unaligned-bytes")  # a partly-set sector bitmap
    merged = vhd.read(child, 0, size)
    assert merged != before
    return parent, child, before, merged


def test_coalesce_killed_at_random_points_then_rerun(
    sr_dir: Path, tmp_path: Path
) -> None:
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    _, _, before, merged = _make_coalesce_pair(pristine)
    size = len(merged)
    # measure a full (slowed) run, so that kills land during the copy
    slow = "0.004"
    timing = tmp_path / "timing"
    shutil.copytree(pristine, timing)
    proc = _spawn(COALESCER, str(timing / "child.vhd"), slow)
    _wait_ready(proc)
    t0 = time.monotonic()
    out, err = _finish(proc, timeout=120)
    full = time.monotonic() - t0
    assert proc.returncode == 0 and "DONE" in out, err[-2000:]
    assert vhd.read(str(timing / "parent.vhd"), 0, size) == merged
    rng = random.Random(8)
    partial = 0
    for run in range(10):
        work = tmp_path / f"run{run}"
        shutil.copytree(pristine, work)
        p, c = str(work / "parent.vhd"), str(work / "child.vhd")
        proc = _spawn(COALESCER, c, slow)
        _wait_ready(proc)
        time.sleep(full * (run + rng.random()) / 10)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        _finish(proc)
        assert vhd.check(p) == [], (
            f"run {run}: parent after killed coalesce: {vhd.check(p)}"
        )
        assert vhd.check(c) == [], (
            f"run {run}: child after killed coalesce: {vhd.check(c)}"
        )
        assert vhd.read(c, 0, size) == merged, f"run {run}: the child's content changed"
        partial += vhd.read(p, 0, size) not in (before, merged)
        vhd.coalesce(c)
        assert vhd.read(p, 0, size) == merged, (
            f"run {run}: parent after re-run coalesce"
        )
        assert vhd.check(p) == []
        shutil.rmtree(work)
    assert partial >= 3, (
        f"only {partial} of 10 kills landed mid-coalesce: the test proved little"
    )
