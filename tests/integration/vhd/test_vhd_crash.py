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
import vhdproof as vp
from smcommon import vhd

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
    """A 32 MiB parent with data, and a child holding ~20 MiB in 12 blocks."""
    size = 32 * MIB
    parent, child = str(d / "parent.vhd"), str(d / "child.vhd")
    vhd.create(parent, size)
    rng = random.Random(4)
    for i in range(0, size, 6 * MIB):
        vhd.write(parent, i + rng.randrange(0, MIB), vp.pattern(i, MIB + 777))
    before = vhd.read(parent, 0, size)
    vhd.snapshot(parent, child)
    for b in range(size // vp.BLOCK):
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
    for run in range(8):
        work = tmp_path / f"run{run}"
        shutil.copytree(pristine, work)
        p, c = str(work / "parent.vhd"), str(work / "child.vhd")
        proc = _spawn(COALESCER, c, slow)
        _wait_ready(proc)
        time.sleep(full * (run + rng.random()) / 8)
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


RESIZER = r"""
import os, signal, sys
import smcommon.vhd as vhd
kill_at = int(sys.argv[3])  # die just before the kill_at-th write/sync (0: never)
calls = 0
for name in ("pwrite", "pwritev", "copy_file_range", "fsync", "fdatasync"):
    real = getattr(os, name, None)
    if real is None:
        continue
    def wrapped(*a, _real=real, **k):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(*a, **k)
    setattr(os, name, wrapped)
print("READY", flush=True)
size = vhd.resize(sys.argv[1], int(sys.argv[2])).virtual_size
print("DONE", size, calls, flush=True)
"""


def test_resize_with_bat_growth_killed_then_rerun(tmp_path: Path) -> None:
    """A grow from 64 MiB to 1 GiB needs a bigger BAT, so the blocks right after
    the BAT move: killed at any point, the image stays sound with its data.

    The kills land at chosen write steps (counted in a first, whole run), not
    at times, so a loaded machine cannot make them miss."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    img = str(pristine / "r.vhd")
    small, big = 64 * MIB, 1024 * MIB
    vhd.create(img, small)
    model = bytearray(small)
    for b in range(small // vp.BLOCK):
        data = vp.pattern(b, 5000 + b)
        vhd.write(img, b * vp.BLOCK + 3 * b, data)
        vp.apply(model, b * vp.BLOCK + 3 * b, data)
    whole = tmp_path / "whole"
    shutil.copytree(pristine, whole)
    proc = _spawn(RESIZER, str(whole / "r.vhd"), str(big), "0")
    _wait_ready(proc)
    out, err = _finish(proc, timeout=120)
    assert proc.returncode == 0 and "DONE" in out, err[-2000:]
    steps = int(out.split()[-1])
    assert steps >= 6, out
    rng = random.Random(12)
    points = sorted({1, steps, *rng.sample(range(1, steps + 1), min(6, steps))})
    for run, kill_at in enumerate(points):
        work = tmp_path / f"run{run}"
        shutil.copytree(pristine, work)
        path = str(work / "r.vhd")
        proc = _spawn(RESIZER, path, str(big), str(kill_at))
        _wait_ready(proc)
        _finish(proc)
        assert proc.returncode == -signal.SIGKILL, f"step {kill_at} of {steps}: not killed"
        assert vhd.check(path) == [], (
            f"step {kill_at}: after killed resize: {vhd.check(path)}"
        )
        size = vhd.info(path).virtual_size
        assert size in (small, big), f"step {kill_at}: size {size}"
        assert vhd.read(path, 0, small) == model, (
            f"step {kill_at}: data lost by a killed resize"
        )
        vhd.resize(path, big)
        assert vhd.read(path, 0, small) == model
        assert vhd.read(path, big - MIB, MIB) == bytes(MIB)
        vhd.write(path, big - 5, b"12345")
        assert vhd.check(path) == []
        shutil.rmtree(work)


META = r"""
import sys
import smcommon.vhd as vhd
leaf, pa, pb, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
size = vhd.info(leaf).virtual_size
print("READY", flush=True)
i = 0
while True:
    i += 1
    k = (seed + i) % 3
    if k == 0:
        h = (i // 3) % 2 == 0
        print(f"W hidden {int(h)}", flush=True); vhd.set_hidden(leaf, h); print(f"ACK hidden {int(h)}", flush=True)
    elif k == 1:
        p = pa if (i // 3) % 2 == 0 else pb
        print(f"W parent {p}", flush=True); vhd.set_parent(leaf, p); print(f"ACK parent {p}", flush=True)
    elif size < 64 * 2**20:
        size += 2 * 2**20
        print(f"W size {size}", flush=True); vhd.resize(leaf, size); print(f"ACK size {size}", flush=True)
"""


def test_metadata_changes_killed_at_random_points(sr_dir: Path) -> None:
    """set_hidden, set_parent (between two identical parents) and resize in a loop,
    SIGKILLed: the leaf stays sound and shows an acknowledged or the in-flight state."""
    pa, pb, leaf = (
        str(sr_dir / "pa.vhd"),
        str(sr_dir / "pb.vhd"),
        str(sr_dir / "leaf.vhd"),
    )
    vhd.create(pa, 8 * MIB)
    vhd.write(pa, 1000, vp.pattern(1, 300_000))
    shutil.copyfile(pa, pb)  # same bytes, same UUID: either is a valid parent
    vhd.snapshot(pa, leaf)
    vhd.write(leaf, 2 * MIB + 7, vp.pattern(2, 9000))
    model = vhd.read(leaf, 0, 8 * MIB)
    state = {"hidden": "0", "parent": pa, "size": str(8 * MIB)}
    rng = random.Random(3)
    mid = 0
    for run in range(12):
        proc = _spawn(META, leaf, pa, pb, str(run))
        _wait_ready(proc)
        time.sleep(rng.random() * 0.3)
        out, _ = _kill(proc)
        inflight: tuple[str, str] | None = None
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "W":
                inflight = (parts[1], parts[2])
            elif parts[0] == "ACK":
                state[parts[1]] = parts[2]
                inflight = None
        mid += inflight is not None
        problems = vhd.check(leaf)
        assert problems == [], f"run {run}: {problems} (in flight: {inflight})"
        info = vhd.info(leaf)
        seen = {
            "hidden": str(int(info.hidden)),
            "parent": str(Path(info.parent or "").resolve()),
            "size": str(info.virtual_size),
        }
        for key, acked in state.items():
            allowed = {str(Path(acked).resolve()) if key == "parent" else acked}
            if inflight and inflight[0] == key:
                allowed.add(
                    str(Path(inflight[1]).resolve()) if key == "parent" else inflight[1]
                )
            assert seen[key] in allowed, (
                f"run {run}: {key} is {seen[key]}, expected one of {allowed}"
            )
            state[key] = seen[key]
        full = bytearray(model) + bytes(info.virtual_size - len(model))
        assert vhd.read(leaf, 0, info.virtual_size) == full, (
            f"run {run}: the leaf's data changed"
        )
    assert mid >= 6, f"only {mid} of 12 kills landed during an operation"


IMPORTER = r"""
import os, sys, time
import smcommon.vhd as vhd
slow = float(sys.argv[3])
if slow:
    for name in ("pwrite", "pwritev", "write", "copy_file_range"):
        real = getattr(os, name, None)
        if real is None:
            continue
        def wrapped(*a, _real=real, **k):
            time.sleep(slow)
            return _real(*a, **k)
        setattr(os, name, wrapped)
print("READY", flush=True)
vhd.import_raw(sys.argv[1], sys.argv[2])
print("DONE", flush=True)
"""


def test_import_killed_leaves_no_half_image(tmp_path: Path) -> None:
    """A new image appears whole or not at all, and leaves nothing else behind:
    import_raw killed at random points."""
    src = tmp_path / "src.raw"
    data = bytearray(24 * MIB)
    for b in range(0, 24, 2):
        data[b * MIB : b * MIB + 700_000] = vp.pattern(b, 700_000)
    src.write_bytes(data)
    slow = "0.01"
    proc = _spawn(IMPORTER, str(src), str(tmp_path / "timing.vhd"), slow)
    _wait_ready(proc)
    t0 = time.monotonic()
    out, err = _finish(proc, timeout=120)
    full = time.monotonic() - t0
    assert "DONE" in out, err[-2000:]
    rng = random.Random(5)
    appeared = 0
    for run in range(6):
        dest = tmp_path / f"imp{run}.vhd"
        proc = _spawn(IMPORTER, str(src), str(dest), slow)
        _wait_ready(proc)
        time.sleep(full * (run + rng.random()) / 6)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        _finish(proc)
        if dest.exists():
            appeared += 1
            assert vhd.check(str(dest)) == [], (
                f"run {run}: a half-made image under the final name"
            )
            assert vhd.read(str(dest), 0, len(data)) == data
    assert appeared < 6, "every import finished before its kill: the test proved little"
    # a crash must not leak space either: nothing but the images and the source remain
    names = {p.name for p in tmp_path.iterdir()}
    leftovers = sorted(n for n in names if n != "src.raw" and not n.endswith(".vhd"))
    assert not leftovers, (
        f"killed imports left {leftovers} behind (nothing removes them)"
    )
