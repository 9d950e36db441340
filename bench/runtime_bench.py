#!/usr/bin/env python3
"""Per-call cost of the plugin runtime against the interpreter's own floor.

The toolstack starts one process per call, so what a plugin costs is mostly
start-up and imports.  This bench times (median of N, runs interleaved so
drift hits every subject alike), all with this same interpreter
(``sys.executable``; ``python3`` on PATH may be a slow shim):

- ``python -I -c pass``                    the floor
- ``python -I -c 'import xmlrpc.client'``  the peer the issue measures against
- ``python -c pass``                       the floor without -I (how a plugin starts)
- a minimal plugin executable (a driver whose Query.query returns a static
  dict, handed to ``smcommon.plugin.main``) answering one Query.query on stdin
- plugins/ext/EXTSR answering the same request, when it exists

and prints the ratio plugin / peer (the issue's limit: 2.0).  In-process, it
also times building the response of an SR.scan of 1,000 VDIs (check against
the declared type + marshal) against ``xmlrpc.client.dumps`` of the same
value (which writes ``<int>`` where we write ``<i8>``).  Bytecode is
cached in a private PYTHONPYCACHEPREFIX (as an installed package has its .pyc
files), after one warm-up call.

    python3 bench/runtime_bench.py [-n 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

PLUGIN = """\
from smcommon import plugin

QUERY = {
    "driver": "bench", "name": "bench", "description": "static", "vendor": "bench",
    "copyright": "-", "version": "1.0", "required_api_version": "2.0",
    "features": ["VDI_CREATE"], "configuration": {"path": "a directory"},
}


class Driver:
    def __init__(self, paths):
        pass

    def query_query(self, dbg):
        return QUERY


if __name__ == "__main__":
    plugin.main(Driver)
"""


EXTSR = Path(__file__).resolve().parents[1] / "plugins" / "ext" / "EXTSR"


def timed(
    argv: list[str], env: dict[str, str], stdin: bytes = b""
) -> tuple[float, bytes]:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"{argv} failed rc={proc.returncode}: {proc.stderr.decode()[-500:]}"
        )
    return took, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", type=int, default=30, help="runs per subject (default 30)"
    )
    args = parser.parse_args()
    py = sys.executable
    request = xmlrpc.client.dumps(({"dbg": "bench"},), "Query.query").encode()
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        script = Path(tmp, "BENCHSR")
        script.write_text(PLUGIN)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["SM_ROOT"] = str(Path(tmp, "root"))
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp, "pycache"))
        subjects = {
            "python -I -c pass": ([py, "-I", "-c", "pass"], env, b""),
            "python -I -c 'import xmlrpc.client'": (
                [py, "-I", "-c", "import xmlrpc.client"],
                env,
                b"",
            ),
            "python -c pass": ([py, "-c", "pass"], env, b""),
            "plugin Query.query": ([py, str(script)], env, request),
        }
        if EXTSR.exists():  # the real plugin on the same runtime, for reference
            subjects["EXTSR Query.query"] = ([py, str(EXTSR)], env, request)
        _, out = timed(
            *subjects["plugin Query.query"]
        )  # warm-up: writes the .pyc files
        (body,), _ = xmlrpc.client.loads(out)
        assert body["Status"] == "Success" and body["Value"]["driver"] == "bench", body
        times: dict[str, list[float]] = {name: [] for name in subjects}
        for _ in range(args.n):
            for name, subject in subjects.items():
                times[name].append(timed(*subject)[0])
    med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    print(
        f"interpreter: {py} (Python {sys.version.split()[0]}); {args.n} runs each, medians"
    )
    for name, ms in med.items():
        print(f"  {name:<40} {ms:7.1f} ms")
    peer = med["python -I -c 'import xmlrpc.client'"]
    plugin = med["plugin Query.query"]
    print(
        f"ratio plugin Query.query / import xmlrpc.client: {plugin / peer:.2f} (limit 2.00)"
    )
    print(
        f"ratio plugin Query.query / python -I -c pass:    {plugin / med['python -I -c pass']:.2f}"
    )
    print(
        f"plugin cost above 'python -c pass': {plugin - med['python -c pass']:.1f} ms"
    )
    scan_response(args.n)


def scan_response(n: int) -> None:
    from smcommon import api, rpc

    infos = [
        {
            "vdi": f"{i:08d}-0000-4000-8000-000000000000",
            "name_label": f"disk {i}",
            "virtual_size": 1 << 30,
            "physical_utilisation": 1 << 20,
            "is_a_snapshot": i % 2 == 0,
            "snapshot_of": "x",
            "snapshot_time": "20261125T00:00:00Z",
            "sm_config": {"vdi_type": "vhd"},
        }
        for i in range(1000)
    ]
    method = api.METHODS["SR.scan"]
    ours, peer = [], []
    for _ in range(n):
        start = time.perf_counter()
        value = method.check_result(infos)
        body = rpc.success(value, method.output)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        xmlrpc.client.dumps(
            ({"Status": "Success", "Value": value},), methodresponse=True
        )
        peer.append(time.perf_counter() - start)
    a, b = statistics.median(ours) * 1000, statistics.median(peer) * 1000
    print(f"SR.scan response of 1,000 VDIs ({len(body) >> 10} KiB), medians of {n}:")
    print(f"  check + rpc.success                      {a:7.1f} ms")
    print(f"  xmlrpc.client.dumps (no check)           {b:7.1f} ms")
    print(f"ratio ours / xmlrpc.client.dumps: {a / b:.2f}")


if __name__ == "__main__":
    main()
