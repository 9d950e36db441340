#!/usr/bin/env python3
"""Per-call cost of the ext plugin executable, against the interpreter's floor.

Prints, for each figure, the median of ``--runs`` runs measured in this run:

  floor   python -c pass                      (same interpreter: sys.executable)
  floor   python -I -c 'import xmlrpc.client'
  EXTSR   Query.query, VDI.create, VDI.snapshot, SR.scan (a small SR)
          each with its ratio to both floors (aim: Query.query <= 2x the
          xmlrpc floor)
  scan    SR.scan through the executable of an SR holding ``--scan-vdis``
          visible VDIs in snapshot trees (built in-process through the ext
          driver, which is much faster than a process per VDI; aim < 1 s)
  big     VDI.snapshot of a ``--big-gib`` GiB VDI with ``--written-gib`` GiB
          written vs of an empty VDI of the same size (the first snapshot,
          where the leaf holds the data, and the median of the next ones)

Every host path lives under a temporary SM_ROOT, removed at the end.

    python3 bench/plugin_bench.py                   # everything, 10 GiB / 5 GiB
    python3 bench/plugin_bench.py --written-gib 1   # quicker big-VDI figures
    python3 bench/plugin_bench.py --skip-big --scan-vdis 200
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the bench keeps its SRs in temporary directories: those are its SR roots
os.environ.setdefault("SM_SR_PATHS", tempfile.gettempdir())

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins" / "ext" / "EXTSR"
MiB = 1024 * 1024
GiB = 1024 * MiB


class Bench:
    def __init__(self, root: Path, runs: int) -> None:
        self.root = root
        self.runs = runs
        self.env = dict(os.environ, SM_ROOT=str(root))

    def timed(self, argv: list[str], data: str | None = None) -> tuple[float, str]:
        t0 = time.perf_counter()
        p = subprocess.run(
            argv, input=data, capture_output=True, text=True, env=self.env, check=False
        )
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{argv[:3]} exited {p.returncode}: {p.stderr[-2000:]}")
        return dt, p.stdout

    def call(self, method: str, **args: Any) -> tuple[float, Any]:
        args.setdefault("dbg", "bench")
        req = xmlrpc.client.dumps((args,), methodname=method)
        dt, out = self.timed([sys.executable, str(PLUGIN)], req)
        params, _ = xmlrpc.client.loads(out)
        body: dict[str, Any] = params[0]  # type: ignore[assignment]
        if body.get("Status") != "Success":
            raise SystemExit(f"{method} failed: {body.get('ErrorDescription')}")
        return dt, body["Value"]

    def median(self, fn: Callable[[int], float]) -> float:
        fn(-1)  # warm the page cache
        return statistics.median(fn(i) for i in range(self.runs))

    def floors_once(self) -> dict[str, float]:
        py = sys.executable
        return {
            "floor": self.timed([py, "-c", "pass"])[0],
            "xmlrpc": self.timed([py, "-I", "-c", "import xmlrpc.client"])[0],
        }

    def report(self, name: str, fn: Callable[[int], float]) -> float:
        """Median of ``fn`` and the median of its per-run ratios to both floors,
        each floor run right before the call (load drifts cancel in a pair)."""
        fn(-1)
        secs, ratios = [], {"floor": [], "xmlrpc": []}  # type: ignore[var-annotated]
        for i in range(self.runs):
            floors = self.floors_once()
            t = fn(i)
            secs.append(t)
            for k, f in floors.items():
                ratios[k].append(t / f)
        med = statistics.median(secs)
        text = f"  {name:<44} {med * 1000:9.1f} ms"
        for k, r in ratios.items():
            text += f"   {statistics.median(r):5.2f}x {k}"
        print(text, flush=True)
        return med


def row(name: str, secs: float, floors: dict[str, float] | None = None) -> None:
    text = f"  {name:<44} {secs * 1000:9.1f} ms"
    for k, floor in (floors or {}).items():
        text += f"   {secs / floor:5.2f}x {k}"
    print(text, flush=True)


def load_driver(root: Path) -> Any:
    """The ext driver object, in this process (the plugin's own factory)."""
    os.environ["SM_ROOT"] = str(root)
    sys.path.insert(0, str(PLUGIN.parent))
    spec = importlib.util.spec_from_file_location(
        "ext_driver", PLUGIN.parent / "ext_driver.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit("plugins/ext/ext_driver.py not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from smcommon.paths import Paths

    paths = Paths.from_env(root)
    for name in ("driver_factory", "make_driver", "ExtDriver"):
        factory = getattr(mod, name, None)
        if factory is not None:
            return factory(paths)
    raise SystemExit("ext_driver.py has no driver_factory/make_driver/ExtDriver")


def build_trees(driver: Any, sr: str, visible: int, per_tree: int = 4) -> int:
    """``visible`` VDIs: bases each with per_tree-1 snapshots (chains and forks)."""
    made = 0
    t0 = time.perf_counter()
    while made < visible:
        base = driver.vdi_create(
            dbg="bench",
            sr=sr,
            vdi_info={"name_label": f"b{made}", "virtual_size": 64 * MiB},
        )
        made += 1
        for _ in range(per_tree - 1):
            if made >= visible:
                break
            driver.vdi_snapshot(dbg="bench", sr=sr, vdi_info={"vdi": base["vdi"]})
            made += 1
    print(
        f"  (built {made} VDIs in-process in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--scan-vdis", type=int, default=1000)
    ap.add_argument("--big-gib", type=int, default=10)
    ap.add_argument("--written-gib", type=float, default=5)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary SM_ROOT")
    opts = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="plugin-bench-"))
    try:
        run(Bench(root, opts.runs), opts)
    finally:
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def run(b: Bench, opts: argparse.Namespace) -> None:
    py = sys.executable
    print(
        f"interpreter {py} (Python {sys.version.split()[0]}); medians of {b.runs} runs"
    )
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    floors = {
        "python -c pass": b.median(lambda _: b.timed([py, "-c", "pass"])[0]),
        "python -I -c 'import xmlrpc.client'": b.median(
            lambda _: b.timed([py, "-I", "-c", "import xmlrpc.client"])[0]
        ),
    }
    short = {
        "floor": floors["python -c pass"],
        "xmlrpc": floors["python -I -c 'import xmlrpc.client'"],
    }
    print("floors:")
    for k, v in floors.items():
        row(k, v)

    sr = str(uuid.uuid4())
    sr_dir = b.root / "sr"
    sr_dir.mkdir()
    b.call("SR.create", sr=sr, device_config={"path": str(sr_dir)}, physical_size="0")
    b.call("SR.attach", sr=sr, device_config={"path": str(sr_dir)})

    print(
        "EXTSR per call (median; median of per-run ratios to each floor run just before):"
    )
    b.report("Query.query", lambda _: b.call("Query.query")[0])
    created: list[str] = []

    def create(_: int) -> float:
        dt, v = b.call(
            "VDI.create", sr=sr, vdi_info={"name_label": "c", "virtual_size": str(GiB)}
        )
        created.append(v["vdi"])
        return dt

    b.report("VDI.create (1 GiB)", create)
    base = created[0]
    b.report(
        "VDI.snapshot",
        lambda _: b.call("VDI.snapshot", sr=sr, vdi_info={"vdi": base})[0],
    )
    n = len(b.call("SR.scan", sr=sr)[1])
    b.report(f"SR.scan ({n} VDIs)", lambda _: b.call("SR.scan", sr=sr)[0])

    if opts.scan_vdis:
        big_sr = str(uuid.uuid4())
        d = b.root / "sr-scan"
        d.mkdir()
        b.call(
            "SR.create", sr=big_sr, device_config={"path": str(d)}, physical_size="0"
        )
        b.call("SR.attach", sr=big_sr, device_config={"path": str(d)})
        driver = load_driver(b.root)
        build_trees(driver, big_sr, opts.scan_vdis)
        n = len(b.call("SR.scan", sr=big_sr)[1])
        vhds = sum(1 for p in d.rglob("*.vhd"))
        print(
            f"SR.scan of a large SR ({n} visible VDIs, {vhds} images with hidden parents):"
        )
        b.report(f"SR.scan ({n} VDIs)", lambda _: b.call("SR.scan", sr=big_sr)[0])

    if not opts.skip_big:
        big_snapshots(b, sr, opts.big_gib, opts.written_gib, short)


def big_snapshots(
    b: Bench, sr: str, size_gib: int, written_gib: float, short: dict[str, float]
) -> None:
    from smcommon import vhd

    size = size_gib * GiB
    _, full = b.call(
        "VDI.create", sr=sr, vdi_info={"name_label": "full", "virtual_size": str(size)}
    )
    _, empty = b.call(
        "VDI.create", sr=sr, vdi_info={"name_label": "empty", "virtual_size": str(size)}
    )
    _, info = b.call("VDI.attach", sr=sr, vdi=full["vdi"], dp="bench", read_write=True)
    b.call("VDI.activate", sr=sr, vdi=full["vdi"], dp="bench")
    chunk = 64 * MiB
    data = os.urandom(MiB) * (chunk // MiB)
    total = int(written_gib * GiB)
    t0 = time.perf_counter()
    # spread the data over the disk (every other chunk) when it fits twice
    stride = 2 * chunk if 2 * total <= size else chunk
    for i in range(total // chunk):
        vhd.write(info["params"], i * stride, data)
    wrote = time.perf_counter() - t0
    b.call("VDI.deactivate", sr=sr, vdi=full["vdi"], dp="bench")
    b.call("VDI.detach", sr=sr, vdi=full["vdi"], dp="bench")
    print(
        f"VDI.snapshot of a {size_gib} GiB VDI with {written_gib:g} GiB written "
        f"(written in {wrote:.1f}s) vs of an empty one:"
    )
    for label, vdi in (("with data", full["vdi"]), ("empty", empty["vdi"])):
        first, _ = b.call("VDI.snapshot", sr=sr, vdi_info={"vdi": vdi})
        row(f"first snapshot, {label}", first, short)

        def snap(_: int, v: str = vdi) -> float:
            return float(b.call("VDI.snapshot", sr=sr, vdi_info={"vdi": v})[0])

        b.report(f"next snapshots, {label}", snap)


if __name__ == "__main__":
    sys.exit(main())
