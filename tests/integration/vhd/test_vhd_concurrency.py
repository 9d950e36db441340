"""Several processes on one image at once (bounded, a few seconds).

Two writers allocating fresh blocks of the same dynamic image: every write
either is acknowledged and then reads back, or fails with a VhdError (e.g. the
image is busy) -- the image must end sound.  A reader (info, read, check) running
while one process writes must never be told the image is corrupt: a GC that
believed it would act on a sound image.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from smcommon import vhd

pytestmark = pytest.mark.integration

BLOCK = vhd.BLOCK_SIZE

WRITER = r"""
import sys
import smcommon.vhd as vhd
path, start, step, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
acked, refused = [], []
for b in range(start, count, step):
    try:
        vhd.write(path, b * vhd.BLOCK_SIZE + 100, bytes([b % 250 + 1]) * 5000)
        acked.append(b)
    except vhd.VhdError as exc:
        refused.append((b, str(exc)))
print(repr((acked, refused)), flush=True)
"""

READER = r"""
import sys, time
import smcommon.vhd as vhd
path, stop = sys.argv[1], sys.argv[2]
import os
seen = []
rounds = 0
while not os.path.exists(stop) or rounds < 3:
    rounds += 1
    try:
        vhd.info(path)
        vhd.read(path, 0, 4 * vhd.BLOCK_SIZE)
        problems = vhd.check(path)
        if problems:
            seen.append("check: " + "; ".join(problems))
    except vhd.Corrupt as exc:
        seen.append(f"{type(exc).__name__}: {exc}")
    except vhd.VhdError:
        pass  # e.g. busy: allowed
print(repr((rounds, seen[:5], len(seen))), flush=True)
"""


def _py(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> Any:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"process failed: {err[-3000:]}"
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_two_writers_allocating_blocks_keep_every_acknowledged_write(
    sr_dir: Path,
) -> None:
    img = str(sr_dir / "two.vhd")
    count = 64
    vhd.create(img, count * BLOCK)
    procs = [_py(WRITER, img, str(start), "2", str(count)) for start in (0, 1)]
    results = [_result(p) for p in procs]
    acked = [b for res in results for b in res[0]]
    refused = [r for res in results for r in res[1]]
    problems = vhd.check(img)
    assert problems == [], (
        f"two concurrent writers left the image damaged: {problems[:3]} (refused: {refused[:2]})"
    )
    lost = [
        b
        for b in acked
        if vhd.read(img, b * BLOCK + 100, 5000) != bytes([b % 250 + 1]) * 5000
    ]
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. blocks {lost[:5]}"
    assert len(acked) + len(refused) == count


def test_reader_never_sees_a_sound_image_as_corrupt_during_writes(sr_dir: Path) -> None:
    img = str(sr_dir / "rw.vhd")
    count = 160
    vhd.create(img, count * BLOCK)
    stop = sr_dir / "stop"
    reader = _py(READER, img, str(stop))
    writer = _py(WRITER, img, "0", "1", str(count))
    acked, refused = _result(writer)
    stop.touch()
    rounds, seen, bad = _result(reader)
    assert not refused and len(acked) == count
    assert bad == 0, (
        f"{bad} of {rounds} reader rounds were told the image is corrupt, e.g. {seen}"
    )
    assert vhd.check(img) == []


COALESCER = r"""
import sys
import smcommon.vhd as vhd
print("DONE", vhd.coalesce(sys.argv[1]), flush=True)
"""

LEAF_READER = r"""
import os, random, sys
import smcommon.vhd as vhd
leaf, expect_file, stop = sys.argv[1], sys.argv[2], sys.argv[3]
expected = open(expect_file, "rb").read()
rng = random.Random(1)
rounds, wrong, busy = 0, [], 0
while not os.path.exists(stop) or rounds < 3:
    rounds += 1
    off = rng.randrange(0, len(expected) - 1)
    n = min(rng.choice([512, 65536, 3 << 20]), len(expected) - off)
    try:
        if vhd.read(leaf, off, n) != expected[off:off + n]:
            wrong.append((off, n))
    except vhd.Busy:
        busy += 1
print(repr((rounds, wrong[:5], busy)), flush=True)
"""


def test_leaf_reads_stay_right_while_an_ancestor_is_coalesced(sr_dir: Path) -> None:
    """base <- mid <- leaf: coalescing mid into base (a GC) changes nothing the leaf
    shows; a reader of the leaf running meanwhile must always get its bytes."""
    size = 96 * 1024 * 1024
    base, mid, leaf = (str(sr_dir / n) for n in ("base.vhd", "mid.vhd", "leaf.vhd"))
    vhd.create(base, size)
    vhd.write(base, 0, bytes([7]) * (5 * BLOCK))
    vhd.snapshot(base, mid)
    for b in range(1, size // BLOCK, 2):
        vhd.write(mid, b * BLOCK + 512, bytes([b % 250 + 1]) * (BLOCK - 1024))
    vhd.snapshot(mid, leaf)
    vhd.write(leaf, 3 * BLOCK, b"leaf" * 1000)
    expected = vhd.read(leaf, 0, size)
    expect_file = sr_dir / "expected.raw"
    expect_file.write_bytes(expected)
    stop = sr_dir / "stop"
    reader = _py(LEAF_READER, leaf, str(expect_file), str(stop))
    coalescer = _py(COALESCER, mid)
    out, err = coalescer.communicate(timeout=120)
    stop.touch()
    assert coalescer.returncode == 0 and "DONE" in out, err[-2000:]
    rounds, wrong, busy = _result(reader)
    assert not wrong, (
        f"{len(wrong)} of {rounds} leaf reads returned wrong bytes during the coalesce: {wrong}"
    )
    assert busy == 0, f"{busy} of {rounds} leaf reads were refused as busy"
    assert vhd.read(base, 0, size) == vhd.read(mid, 0, size)
    assert vhd.read(leaf, 0, size) == expected
