"""The collector process on big sparse disks: VDI.destroy returns while a
large merge is still to be copied, other calls on the same SR proceed while
the collector copies, progress shows in Query.diagnostics, SR.detach stops
it, kill -9 at random points loses nothing, and files the SR did not make
survive all of it.

Sizes: a 40 GiB disk (sparse), ``EXT_BIG_MIB`` MiB (default 2048) written
over a base of a quarter of that; the merge copies the written MiB."""

from __future__ import annotations

import os
import random
import shutil
import time
import uuid
from pathlib import Path

import psutil
import pytest
from ext_helpers import SR, MiB, collector_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.sr_types("ext")]

GiB = 1024 * MiB
BLOCK = 2 * MiB
VIRT = 40 * GiB
BIG_MIB = int(os.environ.get("EXT_BIG_MIB", "2048"))
SEED = int(os.environ.get("EXT_BIG_SEED", "0")) or random.randrange(1, 10**6)
PAYLOAD = random.Random(7).randbytes(BLOCK)


def block_data(block: int, gen: int) -> bytes:
    """What block ``block`` holds after generation ``gen`` wrote it."""
    return block.to_bytes(8, "little") + gen.to_bytes(8, "little") + PAYLOAD[16:]


def write_blocks(path: str, blocks: dict[int, int]) -> None:
    """Whole 2 MiB blocks, durable, in batches (as a backend would stream them)."""
    from smcommon.vhd.image import open_image

    with open_image(path, writable=True) as img:
        todo = sorted(blocks)
        for i in range(0, len(todo), 32):
            batch = []
            for b in todo[i : i + 32]:
                data = block_data(b, blocks[b])
                if img.block_pos(b) is None:
                    batch.append((b, 0, data, -1))
                else:
                    img.write(b * BLOCK, data)
            if batch:
                img.allocate_blocks(batch)


def verify(sr: SR, vdi: str, blocks: dict[int, int], spot: list[int]) -> None:
    """Every written block (and some never written) reads back exactly."""
    from smcommon.vhd.image import open_image

    with open_image(sr.leaf_path(vdi)) as img:
        for b in sorted(blocks):
            got = img.read(b * BLOCK, BLOCK)
            assert got == block_data(b, blocks[b]), f"VDI {vdi}: block {b} differs"
        for b in spot:
            if b not in blocks:
                assert img.read(b * BLOCK, 4096) == bytes(4096), f"block {b} not zero"


def collector_pids(sr: SR) -> list[psutil.Process]:
    return collector_processes(sr.ext.root)


def wait_copying(sr: SR, timeout: float = 60.0) -> str:
    """Until the diagnostics show the collector copying a merge."""
    deadline = time.monotonic() + timeout
    while True:
        diag = sr.diagnostics()
        if "step: copying" in diag:
            return diag
        assert time.monotonic() < deadline, f"no copy seen:\n{diag}"
        time.sleep(0.05)


def request_gc(sr: SR) -> None:
    """Any change that makes garbage starts the collector (it resumes its journal)."""
    t = sr.create("kick", MiB)["vdi"]
    sr.ok("VDI.destroy", vdi=t)


def add_foreign(sr: SR, tmp: Path) -> dict[str, bytes]:
    from smcommon import vhd

    src = tmp / "theirs.vhd"
    vhd.create(str(src), 4 * MiB)
    vhd.write(str(src), 0, b"theirs" * 100)
    made = {}
    for name in ("someone-elses-disk.vhd", "notes.txt"):
        if name.endswith(".vhd"):
            shutil.copyfile(src, sr.data_dir / name)
        else:
            (sr.data_dir / name).write_text("not a disk\n")
        made[name] = (sr.data_dir / name).read_bytes()
    half = src.read_bytes()
    name = f"{uuid.uuid4()}.vhd"
    (sr.data_dir / name).write_bytes(half[: len(half) // 2])
    made[name] = half[: len(half) // 2]
    return made


@pytest.mark.timeout(1800)
def test_big_merges_in_the_background_and_survive_kills(sr: SR, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    n_leaf = BIG_MIB * MiB // BLOCK
    n_base = max(1, n_leaf // 4)
    total = VIRT // BLOCK
    base_blocks = {b: 1 for b in rng.sample(range(total), n_base)}
    leaf_blocks = dict.fromkeys(rng.sample(range(total), n_leaf), 2)
    for b in list(base_blocks)[: n_base // 4]:  # some overwritten in the leaf
        leaf_blocks[b] = 2
    spot = rng.sample(range(total), 16)
    foreign = add_foreign(sr, tmp_path)

    v = sr.create("big", VIRT)["vdi"]
    with sr.opened(v, rw=True) as path:
        write_blocks(path, base_blocks)
    snap = sr.snapshot(v)["vdi"]
    with sr.opened(v, rw=True) as path:
        write_blocks(path, leaf_blocks)
    want_v = {**base_blocks, **leaf_blocks}
    other = sr.create("other", 64 * MiB)["vdi"]

    # destroy returns with the whole merge still to do
    sr.ok("VDI.destroy", vdi=snap)
    diag = wait_copying(sr)
    assert "progress:" in diag and "gc journal: pending" in diag, diag

    # SR.detach stops the collector mid-copy; SR.attach resumes the merge
    sr.ok("SR.detach")
    assert collector_pids(sr) == []
    assert (sr.data_dir / ".sm" / "gc.json").exists()
    sr.ok("SR.attach", device_config=sr.config)
    wait_copying(sr)

    # other calls on the same SR proceed while the collector copies
    done_while_copying = []
    calls = [
        lambda: sr.snapshot(other)["vdi"],
        lambda: sr.create("during", 8 * MiB)["vdi"],
        lambda: sr.scan(),
        lambda: sr.ok("VDI.stat", vdi=v),
    ]
    made = []
    for i in range(12):
        r = calls[i % len(calls)]()
        if isinstance(r, str):
            made.append(r)
        if "step: copying" not in sr.diagnostics():
            break
        done_while_copying.append(i)
    assert len(done_while_copying) >= 3, (
        f"only {len(done_while_copying)} calls ended while the collector copied"
    )
    for t in made:
        sr.ok("VDI.destroy", vdi=t)

    # kill -9 the collector at random points; each time the next request resumes
    kills = 0
    for _ in range(3):
        time.sleep(rng.uniform(0.0, 1.0))
        procs = collector_pids(sr)
        if not procs:
            break
        for p in procs:
            p.kill()
            p.wait(10)
        kills += 1
        request_gc(sr)
    sr.wait_gc(timeout=600)
    print(f"seed={SEED} blocks={n_leaf} kills={kills}")

    verify(sr, v, want_v, spot)
    verify(sr, other, {}, [0, 1])
    sr.ok("SR.gc")
    from smcommon import vhd

    assert vhd.chain(sr.leaf_path(v)) == [sr.leaf_path(v)]
    ours = [p for p in sr.data_dir.glob("*.vhd") if p.name not in foreign]
    assert [p for p in ours if vhd.info(str(p)).hidden] == []
    for name, data in foreign.items():
        assert (sr.data_dir / name).read_bytes() == data, f"{name} was touched"
    sr.ok("VDI.destroy", vdi=v)
    sr.wait_gc(timeout=600)
    for name, data in foreign.items():
        assert (sr.data_dir / name).read_bytes() == data, f"{name} was touched"
