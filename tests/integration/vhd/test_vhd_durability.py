"""Durability of ``smcommon.vhd`` by its system calls: nothing is acknowledged
before it is on disk.

SIGKILL (test_vhd_crash.py) cannot lose the page cache, so it cannot show a
missing fsync; this module can.  Each operation runs in a subprocess under
``strace -f -y`` (fds printed with their paths); between two markers, every
file the operation wrote must see an fsync/fdatasync after its last write, and
every name it put in place (link/rename) must see an fsync of its directory
afterwards.  Skipped where strace is missing or ptrace is not allowed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import vhd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("strace") is None, reason="strace is not installed"
    ),
]

MIB = vp.MIB
TRACED = (
    "openat,pwrite64,pwritev,pwritev2,write,writev,ftruncate,fallocate,copy_file_range,sendfile,"
    "fsync,fdatasync,syncfs,link,linkat,rename,renameat,renameat2,newfstatat,stat"
)
WRITES = {
    "pwrite64",
    "pwritev",
    "pwritev2",
    "write",
    "writev",
    "ftruncate",
    "fallocate",
}
SYNCS = {"fsync", "fdatasync"}
PLACES = {"link", "linkat", "rename", "renameat", "renameat2"}
LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)")
FD = re.compile(r"\d+<([^>]*)>")
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')

PRELUDE = """
import os, sys
import smcommon.vhd as vhd
def mark(name):
    try:
        os.stat("/nonexistent-VHDPROOF-" + name)
    except OSError:
        pass
mark("BEGIN")
"""


def _trace(cwd: Path, body: str) -> list[tuple[str, str, list[str], list[str]]]:
    code = PRELUDE + body + '\nmark("END")\n'
    res = subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-qq",
            "-s",
            "256",
            "-e",
            f"trace={TRACED}",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    if "PTRACE" in res.stderr and "not permitted" in res.stderr:
        pytest.skip("ptrace is not allowed here")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    begin = next(i for i, ln in enumerate(lines) if "VHDPROOF-BEGIN" in ln)
    end = next(i for i, ln in enumerate(lines) if "VHDPROOF-END" in ln)
    calls = []
    for ln in lines[begin + 1 : end]:
        m = LINE.match(ln)
        if not m or int(m.group(3)) < 0:
            continue
        calls.append(
            (m.group(1), m.group(2), FD.findall(m.group(2)), QUOTED.findall(m.group(2)))
        )
    return calls


def _durability_problems(
    calls: list[tuple[str, str, list[str], list[str]]], root: Path
) -> list[str]:
    last_write: dict[str, int] = {}
    last_sync: dict[str, int] = {}
    placed: list[tuple[int, str]] = []
    rootstr = str(root.resolve())
    for i, (name, _args, fds, quoted) in enumerate(calls):
        if name in WRITES and fds:
            last_write[fds[0]] = i
        elif name in ("copy_file_range", "sendfile") and len(fds) >= 2:
            last_write[fds[1] if name == "copy_file_range" else fds[0]] = i
        elif name in SYNCS and fds:
            last_sync[fds[0]] = i
        elif name in PLACES and quoted:
            target = quoted[-1]
            if not os.path.isabs(target):
                target = os.path.join(rootstr, target)
            placed.append((i, os.path.normpath(target)))
    problems = []
    for path, i in last_write.items():
        if not path.startswith(rootstr):
            continue  # stdout, pipes
        if last_sync.get(path, -1) < i:
            problems.append(
                f"{path}: written (call {i}: {calls[i][0]}) and never synced afterwards"
            )
    for i, target in placed:
        d = os.path.dirname(target)
        if not any(j > i for p, j in last_sync.items() if p == d) and not any(
            name in SYNCS and fds and fds[0] == d for name, _, fds, _ in calls[i + 1 :]
        ):
            problems.append(
                f"{target}: put in place (call {i}: {calls[i][0]}) without an fsync of {d}"
            )
    return problems


def _setup(d: Path) -> None:
    vhd.create(str(d / "dyn.vhd"), 16 * MIB)
    vhd.write(str(d / "dyn.vhd"), 0, b"a" * 5000)
    vhd.create(str(d / "fixed.vhd"), 4 * MIB, fixed=True)
    vhd.create(str(d / "base.vhd"), 16 * MIB)
    vhd.write(str(d / "base.vhd"), 0, vp.pattern(1, 3 * MIB))
    vhd.snapshot(str(d / "base.vhd"), str(d / "leaf.vhd"))
    vhd.write(str(d / "leaf.vhd"), 5 * MIB, vp.pattern(2, 3 * MIB))
    shutil.copyfile(d / "base.vhd", d / "base2.vhd")
    (d / "src.raw").write_bytes(vp.pattern(3, MIB) + bytes(3 * MIB))


OPERATIONS = {
    "write-fresh-block": "vhd.write('dyn.vhd', 9 * 2**20 + 7, b'x' * 3000)",
    "write-allocated-block": "vhd.write('dyn.vhd', 100, b'y' * 700)",
    "write-differencing": "vhd.write('leaf.vhd', 12 * 2**20 + 1, b'z' * 70000)",
    "write-fixed": "vhd.write('fixed.vhd', 4095, b'w' * 9000)",
    "create-dynamic": "vhd.create('new.vhd', 8 * 2**20)",
    "create-fixed": "vhd.create('newf.vhd', 4 * 2**20, fixed=True)",
    "snapshot": "vhd.snapshot('leaf.vhd', 'snap.vhd')",
    "set-hidden": "vhd.set_hidden('dyn.vhd', True)",
    "set-parent": "vhd.set_parent('leaf.vhd', 'base2.vhd')",
    "resize-grow-bat": "vhd.resize('dyn.vhd', 600 * 2**20)",
    "coalesce": "vhd.coalesce('leaf.vhd')",
    "import-raw": "vhd.import_raw('src.raw', 'imp.vhd')",
    "convert": "vhd.convert('leaf.vhd', 'flat.vhd')",
    "export-raw": "vhd.export_raw('leaf.vhd', 'out.raw')",
}


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_operation_is_on_disk_when_it_returns(sr_dir: Path, op: str) -> None:
    _setup(sr_dir)
    calls = _trace(sr_dir, OPERATIONS[op])
    assert any(
        c[0] in WRITES or c[0] in PLACES or c[0] == "copy_file_range" for c in calls
    ), "the trace saw no writes"
    problems = _durability_problems(calls, sr_dir)
    assert not problems, f"{op}: " + "; ".join(problems)
    assert vhd.check(str(sr_dir / "dyn.vhd")) == []
