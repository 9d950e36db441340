#!/usr/bin/env python3
"""Plugin runs of two checkouts, run directly, alternating, against the floor.

A plugin run by hand, or by a toolstack that executes it, pays its start-up on
every call (issue 13: direct VDI.* within 1.3x the floor ``python -I -c
'import xmlrpc.client'``).  This machine's speed drifts by a third within the
hour, so each round runs, for each checkout in turn: the floor, then EXTSR's
VDI.create, VDI.stat and VDI.snapshot of a new VDI (``--calls`` rounds, each
checkout with its own library: ``PYTHONPATH``; the package's interpreter).  It
prints each checkout's medians and their ratios to the floor of the same rounds.

Usage:
    .venv/bin/python bench/direct_ab.py OLD_CHECKOUT [NEW_CHECKOUT (this one)] [--calls 15] [--pre 0]

``--pre N`` first puts N VDIs in each SR.  An old checkout: ``git worktree add /tmp/old <rev>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SR = "11111111-2222-4333-8444-555555555555"
NEW = 'vdi_info={"name_label": "ab", "virtual_size": "1M"}'


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return (time.perf_counter() - t) * 1000, p.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=REPO)
    p.add_argument("--calls", type=int, default=15, help="rounds (15)")
    p.add_argument("--pre", type=int, default=0, help="VDIs put in each SR first (0)")
    args = p.parse_args()
    py = sys.executable
    repos = [args.old.resolve(), args.new.resolve()]
    with tempfile.TemporaryDirectory(prefix="direct-ab-") as tmp:
        setup: dict[Path, tuple[dict[str, str], list[str]]] = {}
        for n, repo in enumerate(repos):
            root = Path(tmp) / str(n)
            env = dict(os.environ, SM_ROOT=str(root / "state"), SM_SR_PATHS=tmp, PYTHONPATH=str(repo / "lib"))
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode kept
            plugin = [py, str(repo / "plugins" / "ext" / "EXTSR")]
            dc = "device_config=" + json.dumps({"path": str(root / "sr")})
            for call in (["SR.create", f"sr={SR}", dc, "physical_size=0"], ["SR.attach", f"sr={SR}", dc]):
                timed(plugin + call, env)
            for _ in range(args.pre):
                timed([*plugin, "VDI.create", f"sr={SR}", NEW], env)
            setup[repo] = (env, plugin)
        got = {r: {"floor": [], "VDI.create": [], "VDI.stat": [], "VDI.snapshot": []} for r in repos}
        for _ in range(args.calls):
            for repo in repos:
                env, plugin = setup[repo]
                ms = got[repo]
                ms["floor"].append(timed([py, "-I", "-c", "import xmlrpc.client"], env)[0])
                t, out = timed([*plugin, "VDI.create", f"sr={SR}", NEW, "--json"], env)
                ms["VDI.create"].append(t)
                vdi = json.loads(out)["Value"]["vdi"]
                ms["VDI.stat"].append(timed([*plugin, "VDI.stat", f"sr={SR}", f"vdi={vdi}"], env)[0])
                snap = f'vdi_info={{"vdi": "{vdi}"}}'
                ms["VDI.snapshot"].append(timed([*plugin, "VDI.snapshot", f"sr={SR}", snap], env)[0])
    print(f"python {sys.version.split()[0]}, {args.calls} rounds, {args.pre} VDIs first, "
          f"load {os.getloadavg()[0]:.2f}; medians, ms (ratio to the floor)")  # fmt: skip
    print("| checkout | floor | VDI.create | VDI.stat | VDI.snapshot |\n|---|---|---|---|---|")
    for repo in repos:
        m = {k: statistics.median(v) for k, v in got[repo].items()}
        cells = [f"{m[k]:.1f} ({m[k] / m['floor']:.2f})" for k in ("VDI.create", "VDI.stat", "VDI.snapshot")]
        print(f"| {repo} | {m['floor']:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
