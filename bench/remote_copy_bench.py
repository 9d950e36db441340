#!/usr/bin/env python3
"""VDI.copy to another host: MB/s of a remote copy against a local copy, same run.

Starts two dispatchers ("hosts" A and B: own SM_ROOTs, default ext SRs, TCP on
127.0.0.1) in a temporary directory, fills a VDI on A (every other 2 MiB block
random data, the rest zeros), then times, ``--runs`` times each:

  local   VDI.copy on A into a second SR of A (url "")
  remote  VDI.copy on A into B's SR (url = B's http URL)

and prints the medians, MB/s of the virtual size, and the ratio remote/local.
Each copy is checked equal to the source (vhd.export_raw) once.

    python3 bench/remote_copy_bench.py [--size-mib 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "lib"))

from smcommon import vhd

from dispatcher import client

MiB = 1 << 20


def ok(r: dict[str, Any]) -> Any:
    if r.get("Status") != "Success":
        raise SystemExit(f"call failed: {r}")
    return r["Value"]


def start(base: Path, name: str) -> tuple[subprocess.Popen[str], str, str, Path]:
    root = base / name / "root"
    root.mkdir(parents=True)
    argv = [
        sys.executable, "-m", "dispatcher", "--plugins-dir", str(REPO / "plugins"),
        "--tcp", "127.0.0.1:0", "--timeout", "600",
        "--default-sr", str(base / name / "sr"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", SM_ROOT=str(root))
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    banner = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        banner += line
        if line.startswith("  python:"):
            break
    url = re.search(r"tcp: (http://\S+)", banner)
    sr = re.search(r"default SR: (\S+)", banner)
    sock = re.search(r"unix socket: (\S+)", banner)
    if not (url and sr and sock):
        proc.kill()
        raise SystemExit(f"dispatcher {name} did not start:\n{banner}")
    return proc, url.group(1), sr.group(1), Path(sock.group(1))


def leaf(sm: Any, sr: str, vdi: str) -> str:
    url = ok(sm.VDI.get_url({"dbg": "b", "sr": sr, "vdi": vdi}))
    return urllib.parse.unquote(urllib.parse.urlparse(url).path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    ns = p.parse_args()
    size = ns.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="remote-copy-bench-") as tmp:
        base = Path(tmp)
        pa, _url_a, sra, sock_a = start(base, "a")
        pb, url_b, srb, sock_b = start(base, "b")
        try:
            a = client.connect(sock_a, timeout=900)
            b = client.connect(sock_b, timeout=900)
            ext = client.connect(sock_a, path="/ext", timeout=900)
            sr2 = str(uuid.uuid4())
            dc = {"path": str(base / "a" / "sr2")}
            (base / "a" / "sr2").mkdir()
            ok(
                ext.SR.create(
                    {"dbg": "b", "sr": sr2, "device_config": dc, "physical_size": 0}
                )
            )
            ok(a.SR.attach({"dbg": "b", "sr": sr2, "device_config": dc}))
            # (xmlrpc.client marshals ints up to 2**31 - 1 only)
            info = {"name_label": "bench", "virtual_size": size}
            v = ok(a.VDI.create({"dbg": "b", "sr": sra, "vdi_info": info}))["vdi"]
            args = {"dbg": "b", "sr": sra, "vdi": v, "dp": "fill"}
            params = ok(a.VDI.attach({**args, "read_write": True}))["params"]
            with vhd.Image.open(params, writable=True) as img:
                for off in range(0, size, 4 * MiB):
                    img.write(off, os.urandom(min(2 * MiB, size - off)))
            ok(a.VDI.detach(args))
            src_raw = base / "src.raw"
            vhd.export_raw(params, src_raw)
            times: dict[str, list[float]] = {"local": [], "remote": []}
            for i in range(ns.runs):
                for kind, sm_dest, url, dest in (
                    ("local", a, "", sr2),
                    ("remote", b, url_b, srb),
                ):
                    t0 = time.monotonic()
                    new = ok(
                        a.VDI.copy(
                            {"dbg": "b", "sr": sra, "vdi": v, "url": url, "dest": dest}
                        )
                    )
                    times[kind].append(time.monotonic() - t0)
                    if i == 0:
                        out = base / f"{kind}.raw"
                        vhd.export_raw(leaf(sm_dest, dest, new), out)
                        same = (
                            subprocess.run(
                                ["cmp", "-s", str(src_raw), str(out)], check=False
                            ).returncode
                            == 0
                        )
                        if not same:
                            raise SystemExit(f"{kind} copy differs from the source")
                        out.unlink()
                    ok(sm_dest.VDI.destroy({"dbg": "b", "sr": dest, "vdi": new}))
            mb = size / 1e6
            print(
                f"VDI.copy of {ns.size_mib} MiB (half random, half zero blocks), {ns.runs} runs"
            )
            for kind, ts in times.items():
                med = statistics.median(ts)
                print(
                    f"  {kind:6s} median {med:.3f}s  {mb / med:7.1f} MB/s  (runs: {', '.join(f'{t:.3f}' for t in ts)})"
                )
            ratio = statistics.median(times["remote"]) / statistics.median(
                times["local"]
            )
            print(f"  remote/local time ratio: {ratio:.2f}")
        finally:
            for proc in (pa, pb):
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
