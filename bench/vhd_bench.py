"""Benchmark of the VHD library (smcommon.vhd) against peers measured in the same run.

Prints figures and ratios (library / peer; below 1 is faster than the peer):

1. import of a raw file (first half random data, second half zeros) into a
   dynamic VHD (``vhd.import_raw``) vs ``qemu-img convert -f raw -O vpc -o
   subformat=dynamic``, and export back to raw (``vhd.export_raw``) vs
   ``qemu-img convert -f vpc -O raw``.  Both sides read the same source, which
   was written once and is in the page cache for both; each output is fsync'd
   inside the timed section (qemu-img does not flush by default); the order of
   the two sides alternates between runs.
2. coalesce of a child holding size/4 over a parent of ``size``: MB/s of child
   data, vs the machine's copy speed (``os.copy_file_range`` of the same amount
   into a new file, fsync'd) in the same run.
3. a 2040 GiB dynamic image: create time, on-disk size (st_blocks*512), and
   ``vhd info`` vs ``qemu-img info`` on it (each a process start).

Usage: python bench/vhd_bench.py [--size 1G] [--runs 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smcommon import vhd

MIB = 1024 * 1024
GIB = 1024 * MIB


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": GIB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({res.returncode}): {res.stderr.strip()}")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def remove(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            p.unlink()


def vhd_cmd() -> list[str]:
    script = Path(sys.executable).parent / "vhd"
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from smcommon.vhd.cli import main; sys.exit(main())",
    ]


def make_source(path: Path, size: int) -> None:
    """First half random data, second half zeros (a hole-free file of zeros)."""
    half = size // 2
    chunk = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        done = 0
        while done < half:
            n = min(len(chunk), half - done)
            f.write(chunk[:n] if done % (8 * MIB) else os.urandom(n))
            done += n
        zeros = bytes(4 * MIB)
        while done < size:
            n = min(len(zeros), size - done)
            f.write(zeros[:n])
            done += n
        f.flush()
        os.fsync(f.fileno())


def bench_import_export(d: Path, size: int, runs: int) -> dict[str, list[float]]:
    src = d / "src.raw"
    make_source(src, size)
    lib_vhd, qemu_vhd = d / "lib.vhd", d / "qemu.vhd"
    lib_raw, qemu_raw = d / "lib.raw", d / "qemu.raw"
    t: dict[str, list[float]] = {
        "lib_import": [],
        "qemu_import": [],
        "lib_export": [],
        "qemu_export": [],
    }

    def lib_import() -> None:
        vhd.import_raw(str(src), str(lib_vhd))
        fsync_path(lib_vhd)

    def qemu_import() -> None:
        run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic",
                str(src),
                str(qemu_vhd),
            ]
        )
        fsync_path(qemu_vhd)

    def lib_export() -> None:
        vhd.export_raw(str(lib_vhd), str(lib_raw))
        fsync_path(lib_raw)

    def qemu_export() -> None:
        run(
            [
                "qemu-img",
                "convert",
                "-f",
                "vpc",
                "-O",
                "raw",
                str(qemu_vhd),
                str(qemu_raw),
            ]
        )
        fsync_path(qemu_raw)

    for i in range(runs):
        remove(lib_vhd, qemu_vhd, lib_raw, qemu_raw)
        pairs = [("lib_import", lib_import), ("qemu_import", qemu_import)]
        for name, fn in pairs if i % 2 == 0 else reversed(pairs):
            t[name].append(timed(fn))
        pairs = [("lib_export", lib_export), ("qemu_export", qemu_export)]
        for name, fn in pairs if i % 2 == 0 else reversed(pairs):
            t[name].append(timed(fn))
        if i == 0:  # the two sides must have done the same work
            info = vhd.info(str(lib_vhd))
            expect = -(-(size // 2) // vhd.BLOCK_SIZE)
            if info.allocated_blocks != expect:
                print(
                    f"  WARNING: library import allocated {info.allocated_blocks} blocks, expected {expect}"
                )
            if not same_file(lib_raw, src):
                print("  WARNING: the library's export differs from the source")
    t["lib_vhd_bytes"] = [float(os.stat(lib_vhd).st_blocks * 512)]
    t["qemu_vhd_bytes"] = [float(os.stat(qemu_vhd).st_blocks * 512)]
    remove(src, lib_vhd, qemu_vhd, lib_raw, qemu_raw)
    return t


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MIB), fb.read(8 * MIB)
            if x != y:
                return False
            if not x:
                return True


def bench_coalesce(d: Path, size: int, runs: int) -> dict[str, list[float]]:
    child_bytes = size // 4
    t: dict[str, list[float]] = {"coalesce": [], "copy": []}
    payload = os.urandom(vhd.BLOCK_SIZE)
    parent, child = d / "parent.vhd", d / "child.vhd"
    src, dst = d / "copy.src", d / "copy.dst"

    def copy() -> None:
        with open(src, "rb") as fs, open(dst, "wb") as fd:
            left = child_bytes
            while left:
                left -= os.copy_file_range(fs.fileno(), fd.fileno(), left)
            os.fsync(fd.fileno())

    for _ in range(runs):
        remove(parent, child)
        vhd.create(str(parent), size)
        for off in range(0, size, 16 * vhd.BLOCK_SIZE):  # some parent data
            vhd.write(str(parent), off, payload)
        vhd.snapshot(str(parent), str(child))
        total, count = size // vhd.BLOCK_SIZE, child_bytes // vhd.BLOCK_SIZE
        for k in range(count):  # whole blocks, spread over the disk
            vhd.write(str(child), (k * total // count) * vhd.BLOCK_SIZE, payload)
        t["coalesce"].append(timed(lambda: vhd.coalesce(str(child))))
        remove(parent, child)
        # the machine's copy speed for the same amount of data
        with open(src, "wb") as f:
            for _ in range(child_bytes // len(payload)):
                f.write(payload)
            os.fsync(f.fileno())
        t["copy"].append(timed(copy))
        remove(src, dst)
    t["child_bytes"] = [float(child_bytes)]
    return t


def bench_big(d: Path, runs: int) -> dict[str, list[float]]:
    t: dict[str, list[float]] = {
        "create": [],
        "on_disk": [],
        "vhd_info": [],
        "qemu_info": [],
        "floor": [],
        "in_process": [],
    }
    big = d / "big.vhd"
    for _ in range(runs):
        remove(big)
        t["create"].append(timed(lambda: vhd.create(str(big), vhd.MAX_VIRTUAL_SIZE)))
        t["on_disk"].append(float(os.stat(big).st_blocks * 512))
        t["vhd_info"].append(
            timed(lambda: run([*vhd_cmd(), "info", "--json", str(big)]))
        )
        t["qemu_info"].append(
            timed(
                lambda: run(
                    ["qemu-img", "info", "-f", "vpc", "--output", "json", str(big)]
                )
            )
        )
        # the interpreter's floor: start-up and import of the command, no work
        t["floor"].append(
            timed(lambda: run([sys.executable, "-c", "import smcommon.vhd.cli"]))
        )
        t["in_process"].append(timed(lambda: vhd.info(str(big))))
    remove(big)
    return t


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size",
        default="1G",
        help="raw image size for import/export and the coalesce parent (1G)",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per measurement; medians are printed (3)",
    )
    ap.add_argument(
        "--dir",
        default="/var/tmp",
        help="where the scratch files go (a disk, not tmpfs)",
    )
    ap.add_argument(
        "--only",
        choices=["import", "coalesce", "big"],
        action="append",
        help="run only these parts",
    )
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if size < 8 * MIB or size % vhd.BLOCK_SIZE:
        ap.error("--size must be a multiple of 2 MiB, at least 8 MiB")
    if shutil.which("qemu-img") is None:
        ap.error("qemu-img (qemu-utils) is needed for the peer measurements")
    parts = args.only or ["import", "coalesce", "big"]
    d = Path(tempfile.mkdtemp(prefix="vhd-bench-", dir=args.dir))
    mb = size / MIB
    print(f"vhd_bench: size {mb:.0f} MiB, {args.runs} runs, medians; scratch {d}")
    try:
        if "import" in parts:
            t = bench_import_export(d, size, args.runs)
            li, qi, le, qe = (
                med(t[k])
                for k in ("lib_import", "qemu_import", "lib_export", "qemu_export")
            )
            print(
                f"import  raw->dynamic VHD  lib {li:7.3f}s ({mb / li:7.1f} MB/s)   qemu-img {qi:7.3f}s ({mb / qi:7.1f} MB/s)   ratio lib/qemu {li / qi:5.2f} (median of per-run ratios {pr(t['lib_import'], t['qemu_import']):5.2f})"
            )
            print(
                f"export  VHD->raw          lib {le:7.3f}s ({mb / le:7.1f} MB/s)   qemu-img {qe:7.3f}s ({mb / qe:7.1f} MB/s)   ratio lib/qemu {le / qe:5.2f} (median of per-run ratios {pr(t['lib_export'], t['qemu_export']):5.2f})"
            )
            print(
                f"        on disk: lib VHD {t['lib_vhd_bytes'][0] / MIB:.1f} MiB, qemu VHD {t['qemu_vhd_bytes'][0] / MIB:.1f} MiB"
            )
            print(
                f"        all runs: lib import {fmt(t['lib_import'])} qemu {fmt(t['qemu_import'])}; lib export {fmt(t['lib_export'])} qemu {fmt(t['qemu_export'])}"
            )
        if "coalesce" in parts:
            t = bench_coalesce(d, size, args.runs)
            cb = t["child_bytes"][0] / MIB
            co, cp = med(t["coalesce"]), med(t["copy"])
            print(
                f"coalesce {cb:.0f} MiB child over {mb:.0f} MiB parent: {co:7.3f}s = {cb / co:7.1f} MB/s;   "
                f"copy_file_range+fsync of {cb:.0f} MiB: {cp:7.3f}s = {cb / cp:7.1f} MB/s;   ratio coalesce/copy time {co / cp:5.2f} (per-run {pr(t['coalesce'], t['copy']):5.2f})"
            )
            print(
                f"        all runs: coalesce {fmt(t['coalesce'])} copy {fmt(t['copy'])}"
            )
        if "big" in parts:
            t = bench_big(d, args.runs)
            vi, qi = med(t["vhd_info"]), med(t["qemu_info"])
            print(
                f"2040 GiB dynamic: create {med(t['create']) * 1000:7.1f} ms, on disk {med(t['on_disk']) / MIB:.2f} MiB "
                f"(st_blocks*512);   vhd info {vi * 1000:6.1f} ms   qemu-img info {qi * 1000:6.1f} ms   ratio {vi / qi:5.2f}"
            )
            fl, ip = med(t["floor"]), med(t["in_process"])
            print(
                f"        python start + import smcommon.vhd.cli (floor) {fl * 1000:6.1f} ms;"
                f" vhd info minus floor {(vi - fl) * 1000:6.1f} ms; vhd.info() in process {ip * 1000:6.1f} ms"
            )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


def pr(ours: list[float], peer: list[float]) -> float:
    """Median of the per-run ratios: each pair ran back to back, so load drifts cancel."""
    return med([a / b for a, b in zip(ours, peer, strict=True)])


def fmt(xs: list[float]) -> str:
    return "[" + " ".join(f"{x:.3f}" for x in xs) + "]"


if __name__ == "__main__":
    sys.exit(main())
