#!/usr/bin/env python3
"""VDI.copy to another host over mutual TLS: MB/s against plain HTTP and a local copy, same run.

Starts three dispatchers in a temporary directory (own SM_ROOTs, default ext
SRs): A (Unix socket only), B (TCP on 127.0.0.1 with mutual TLS, letting A in)
and C (TCP on 127.0.0.1, ``--insecure``: plain HTTP); certificates from
scripts/make-certs; A's pool.json lists B (https) and C (http, insecure, on
loopback) as peers.  It fills a VDI on A (every other 2 MiB block random
data, the rest zeros), then times, ``--runs`` times each, in turn:

  local   VDI.copy on A into a second SR of A (url "")
  http    VDI.copy on A into C's SR (plain HTTP)
  tls     VDI.copy on A into B's SR (mutual TLS)

and prints the medians, MB/s of the virtual size, and the ratios: TLS
throughput / plain HTTP throughput (target >= 0.8), remote / local time.
Each copy is checked equal to the source (vhd.export_raw) once.

    python3 bench/remote_copy_bench.py [--size-mib 256] [--runs 3]
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
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "lib"))

import benchd
from smcommon import vhd

from dispatcher import client

MiB = 1 << 20


def ok(r: dict[str, Any]) -> Any:
    if r.get("Status") != "Success":
        raise SystemExit(f"call failed: {r}")
    return r["Value"]


def pool(base: Path, name: str, allow: list[str], peers: list[dict[str, Any]]) -> None:
    pki = base / "pki"
    doc = {"cert": str(pki / f"{name}.pem"), "key": str(pki / f"{name}.key"),
           "ca": str(pki / "ca.pem"), "allow": allow, "peers": peers}  # fmt: skip
    etc = base / name / "root" / "etc" / "sm"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "pool.json").write_text(json.dumps(doc))


def start(
    base: Path, name: str, tcp: list[str]
) -> tuple[subprocess.Popen[str], str | None, str, Path]:
    root = base / name / "root"
    root.mkdir(parents=True, exist_ok=True)
    argv = [
        "--plugins-dir", str(REPO / "plugins"),
        *tcp, "--timeout", "600", "--default-sr", str(base / name / "sr"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", SM_ROOT=str(root), SM_SR_PATHS=str(base))
    d = benchd.start(argv, env=env, stderr=subprocess.DEVNULL)
    d.need("sr", "sock", *(["url"] if tcp else []))
    assert d.sr is not None and d.sock is not None
    return d.proc, d.url, d.sr, d.sock


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
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make-certs"), str(base / "pki"), "a", "b"],
            check=True, capture_output=True,
        )  # fmt: skip
        pool(base, "a", [], [])
        pool(base, "b", ["a"], [])
        procs = []
        try:
            pa, _, sra, sock_a = start(base, "a", [])
            procs.append(pa)
            pb, url_b, srb, sock_b = start(base, "b", ["--tcp", "127.0.0.1:0"])
            procs.append(pb)
            pc, url_c, src_, sock_c = start(base, "c", ["--tcp", "127.0.0.1:0", "--insecure"])
            procs.append(pc)
            pool(base, "a", [], [
                {"name": "b", "url": url_b, "cert_name": "b"},
                {"name": "c", "url": url_c, "insecure": True},
            ])  # fmt: skip
            a = client.connect(sock_a, timeout=900)
            b = client.connect(sock_b, timeout=900)
            c = client.connect(sock_c, timeout=900)
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
            times: dict[str, list[float]] = {"local": [], "http": [], "tls": []}
            for i in range(ns.runs):
                for kind, sm_dest, url, dest in (
                    ("local", a, "", sr2),
                    ("http", c, url_c, src_),
                    ("tls", b, url_b, srb),
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
            meds = {k: statistics.median(v) for k, v in times.items()}
            print(f"  TLS / plain HTTP throughput: {meds['http'] / meds['tls']:.2f} (target >= 0.8)")
            print(f"  remote (TLS) / local time: {meds['tls'] / meds['local']:.2f}")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
