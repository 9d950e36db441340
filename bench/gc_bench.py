#!/usr/bin/env python3
"""The collector: VDI.destroy latency with a large pending merge, and cold coalesce.

Prints medians of ``--runs`` runs, each figure beside its peer measured in
the same run:

  destroy   VDI.destroy (the real EXTSR executable) of a snapshot whose
            destroy leaves a ``--pending`` (default 1 GiB) merge to copy, vs
            of a snapshot whose destroy leaves nothing to copy; ratio (aim
            <= 1.2: the merge is the collector process's, after the call).
            The collector is waited for between runs.
  coalesce  vhd.coalesce of a child holding ``--child`` (default 256 MiB)
            into a parent four times as large, from a cold page cache
            (``echo 3 > /proc/sys/vm/drop_caches`` before each run, root
            only), vs ``os.copy_file_range`` of as many bytes into a new file
            + fsync, cold too; throughput ratio ours/peer (aim >= 0.9).
            Two children: whole 2 MiB blocks, and 64 KiB pieces scattered
            over the blocks (what a VM writes between snapshots), where the
            peer copies the same number of bytes.

Scratch files go to ``--dir`` (default /var/tmp, a disk).

    .venv/bin/python bench/gc_bench.py                 # both parts, 5 runs
    .venv/bin/python bench/gc_bench.py --only coalesce --runs 7
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))
PLUGIN = REPO / "plugins" / "ext" / "EXTSR"
MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 2 * MiB


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- destroy latency -------------------------------------------------------------


class Ext:
    def __init__(self, root: Path) -> None:
        self.env = dict(os.environ, SM_ROOT=str(root))

    def call(self, method: str, **args: Any) -> tuple[Any, float]:
        args.setdefault("dbg", "bench")
        req = xmlrpc.client.dumps((args,), methodname=method)
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, str(PLUGIN)],
            input=req,
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        dt = time.perf_counter() - t0
        (body,), _ = xmlrpc.client.loads(p.stdout)
        if body.get("Status") != "Success":
            raise SystemExit(f"{method} failed: {body.get('ErrorDescription')}")
        return body.get("Value"), dt


def wait_idle(ext: Ext, sr: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text, _ = ext.call("Query.diagnostics")
        part = text[text.find(f"SR {sr} (") :]
        if "gc collector: idle" in part.split("\nSR ")[0]:
            return
        time.sleep(0.1)
    raise SystemExit("the collector did not finish in 600 s")


def write_blocks(path: str, count: int, size: int, rng: random.Random) -> None:
    from smcommon.vhd.image import open_image

    payload = rng.randbytes(BLOCK)
    blocks = sorted(rng.sample(range(size // BLOCK), count))
    with open_image(path, writable=True) as img:
        for i in range(0, len(blocks), 32):
            img.allocate_blocks([(b, 0, payload, -1) for b in blocks[i : i + 32]])


def bench_destroy(d: Path, runs: int, pending: int) -> dict[str, list[float]]:
    root = d / "smroot"
    root.mkdir()
    sr_dir = d / "sr"
    sr_dir.mkdir()
    ext = Ext(root)
    sr = str(uuid.uuid4())
    ext.call("SR.create", sr=sr, device_config={"path": str(sr_dir)}, physical_size="0")
    ext.call("SR.attach", sr=sr, device_config={"path": str(sr_dir)})
    rng = random.Random(1)
    size = 4 * pending
    t: dict[str, list[float]] = {"pending": [], "none": []}
    order = ["pending", "none"]
    try:
        for i in range(runs):
            for kind in order if i % 2 == 0 else order[::-1]:
                v = ext.call(
                    "VDI.create",
                    sr=sr,
                    vdi_info={"name_label": kind, "virtual_size": str(size)},
                )[0]["vdi"]
                snap = ext.call("VDI.snapshot", sr=sr, vdi_info={"vdi": v})[0]["vdi"]
                if kind == "pending":  # the leaf gets the data: a leaf merge to copy
                    leaf = str(sr_dir / f"{v}.vhd")
                    write_blocks(leaf, pending // BLOCK, size, rng)
                wait_idle(ext, sr)
                _, dt = ext.call("VDI.destroy", sr=sr, vdi=snap)
                t[kind].append(dt)
                wait_idle(ext, sr)
                ext.call("VDI.destroy", sr=sr, vdi=v)
                wait_idle(ext, sr)
    finally:
        ext.call("SR.detach", sr=sr)
    return t


# --- cold coalesce ----------------------------------------------------------------


def make_chain(d: Path, child_bytes: int, piece: int) -> tuple[Path, Path]:
    from smcommon import vhd
    from smcommon.vhd.image import open_image

    parent, child = d / "parent.vhd", d / "child.vhd"
    for p in (parent, child):
        p.unlink(missing_ok=True)
    size = 4 * child_bytes
    rng = random.Random(2)
    vhd.create(str(parent), size)
    write_blocks(str(parent), size // BLOCK // 8, size, rng)  # some parent data
    vhd.snapshot(str(parent), str(child))
    if piece == BLOCK:
        write_blocks(str(child), child_bytes // BLOCK, size, rng)
    else:
        # pieces scattered over 4x as many blocks as whole blocks would use
        n = child_bytes // piece
        nblocks = min(size // BLOCK, 4 * child_bytes // BLOCK)
        blocks = rng.sample(range(size // BLOCK), nblocks)
        data = rng.randbytes(piece)
        with open_image(str(child), writable=True) as img:
            for k in range(n):
                b = blocks[k % nblocks]
                slot = (k // nblocks) * 4 % (BLOCK // piece)
                img.write_aligned(
                    b * BLOCK + slot * piece, memoryview(data), sync=False
                )
            img.sync()
    os.sync()
    return parent, child


def bench_coalesce(
    d: Path, runs: int, child_bytes: int, piece: int
) -> dict[str, list[float]]:
    from smcommon import vhd

    t: dict[str, list[float]] = {"ours": [], "copy": []}
    src, dst = d / "copy.src", d / "copy.dst"
    for i in range(runs):
        parent, child = make_chain(d, child_bytes, piece)
        with open(src, "wb") as f:
            f.write(os.urandom(child_bytes))
            os.fsync(f.fileno())

        def ours(parent: Path = parent, child: Path = child) -> None:
            drop_caches()
            t0 = time.perf_counter()
            vhd.coalesce(str(child))
            fsync_path(parent)
            t["ours"].append(time.perf_counter() - t0)

        def copy() -> None:
            dst.unlink(missing_ok=True)
            drop_caches()
            t0 = time.perf_counter()
            with open(src, "rb") as fs, open(dst, "wb") as fd:
                left = child_bytes
                while left:
                    left -= os.copy_file_range(fs.fileno(), fd.fileno(), left)
                os.fsync(fd.fileno())
            t["copy"].append(time.perf_counter() - t0)

        for fn in (ours, copy) if i % 2 == 0 else (copy, ours):
            fn()
    for p in (src, dst, d / "parent.vhd", d / "child.vhd"):
        p.unlink(missing_ok=True)
    return t


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--pending", default="1G", help="merge left by the destroy")
    ap.add_argument("--child", default="256M", help="bytes the coalesced child holds")
    ap.add_argument("--only", action="append", choices=["destroy", "coalesce"])
    a = ap.parse_args()
    parts = a.only or ["destroy", "coalesce"]
    print(f"load average {os.getloadavg()[0]:.2f}, {a.runs} runs, medians")
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="gc-bench-") as tmp:
        d = Path(tmp)
        if "destroy" in parts:
            pending = parse_size(a.pending)
            t = bench_destroy(d, a.runs, pending)
            p, n = median(t["pending"]), median(t["none"])
            print(
                f"VDI.destroy, {pending // MiB} MiB merge pending: {p * 1000:.1f} ms; "
                f"nothing to merge: {n * 1000:.1f} ms; ratio {p / n:.2f} (aim <= 1.2)"
            )
        if "coalesce" in parts:
            if not drop_caches():
                print("coalesce: skipped (dropping the page cache needs root)")
                return 0
            child = parse_size(a.child)
            for piece, label in (
                (BLOCK, "whole 2 MiB blocks"),
                (64 * 1024, "64 KiB pieces"),
            ):
                t = bench_coalesce(d, a.runs, child, piece)
                o, c = median(t["ours"]), median(t["copy"])
                print(
                    f"cold coalesce of {child // MiB} MiB in {label}: {child / o / 1e6:.0f} MB/s "
                    f"({o * 1000:.0f} ms); cold copy_file_range + fsync: "
                    f"{child / c / 1e6:.0f} MB/s ({c * 1000:.0f} ms); "
                    f"throughput ratio {c / o:.2f} (aim >= 0.9)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
