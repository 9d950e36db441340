"""The ``vhd`` command, driven as a subprocess: create, info --json, check, map,
export, import, and its errors (exit code, one line naming the problem, never a
traceback).  The command is the console script of the interpreter running the
tests (``<venv>/bin/vhd``), else the same entry point through ``python -c``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import vhd

pytestmark = pytest.mark.integration

MIB = vp.MIB


def ok(*args: str) -> str:
    res = vp.run_vhd(*args)
    assert res.returncode == 0, (
        f"vhd {' '.join(args)} -> {res.returncode}: {res.stderr}"
    )
    assert "Traceback" not in res.stderr
    return res.stdout


def fails(*args: str, rc: int | None = None) -> str:
    """Run a failing command; its stderr must be one clear line; returns that line."""
    res = vp.run_vhd(*args)
    assert res.returncode != 0, f"vhd {' '.join(args)} succeeded: {res.stdout}"
    if rc is not None:
        assert res.returncode == rc, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert "internal error" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if res.returncode == 2 and lines and lines[0].startswith("usage:"):
        lines = lines[1:]  # argparse: a usage line, then the error
    assert len(lines) == 1, f"expected one line on stderr, got {res.stderr!r}"
    return lines[0]


def _extents(doc: object) -> list[tuple[int, int, int]]:
    """map --json as (offset, length, depth) whatever the container shape."""
    if isinstance(doc, dict):
        doc = next(v for v in doc.values() if isinstance(v, list))
    assert isinstance(doc, list)
    out = []
    for e in doc:
        if isinstance(e, dict):
            out.append((int(e["offset"]), int(e["length"]), int(e["depth"])))
        else:
            out.append(tuple(int(x) for x in e))  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def test_create_and_info_json(sr_dir: Path) -> None:
    img = sr_dir / "a.vhd"
    ok("create", str(img), "10M")
    doc = json.loads(ok("info", "--json", str(img)))
    lib = vhd.info(str(img)).to_dict()
    for key in (
        "uuid",
        "disk_type",
        "virtual_size",
        "block_size",
        "max_blocks",
        "allocated_blocks",
        "parent",
        "depth",
    ):
        assert doc[key] == lib[key], key
    assert doc["virtual_size"] == 10 * MIB and doc["disk_type"] == "dynamic"
    assert vp.qemu_info(img)["virtual-size"] == 10 * MIB
    text = ok("info", str(img))
    assert doc["uuid"] in text
    fixed = sr_dir / "f.vhd"
    ok("create", "--fixed", str(fixed), "3M")
    doc = json.loads(ok("info", "--json", str(fixed)))
    assert doc["disk_type"] == "fixed" and doc["virtual_size"] == 4 * MIB


def test_check_sound_and_damaged(sr_dir: Path) -> None:
    img = sr_dir / "c.vhd"
    ok("create", str(img), "8M")
    vhd.write(str(img), 3 * MIB, b"x" * 5000)
    ok("check", str(img))
    lay = vp.layout(img)
    used = [i for i, e in enumerate(lay.bat) if e != vp.UNUSED]
    vp.set_bat_entry(
        img, used[0], lay.size // 512 + 10_000
    )  # data past the end of the file
    res = vp.run_vhd("check", str(img))
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout.strip() or res.stderr.strip(), (
        "check found problems but named none"
    )
    res = vp.run_vhd("check", "--json", str(img))
    assert res.returncode == 3
    problems = json.loads(res.stdout)
    if isinstance(problems, dict):
        problems = next(v for v in problems.values() if isinstance(v, list))
    assert problems and all(isinstance(p, str) and p for p in problems)


def test_map_matches_the_library(sr_dir: Path) -> None:
    base, leaf = sr_dir / "b.vhd", sr_dir / "l.vhd"
    vhd.create(str(base), 8 * MIB)
    vhd.write(str(base), 0, b"b" * 4096)
    vhd.snapshot(str(base), str(leaf))
    vhd.write(str(leaf), 5 * MIB, b"l" * 4096)
    extents = _extents(json.loads(ok("map", "--json", str(leaf))))
    assert extents == [tuple(e) for e in vhd.allocation_map(str(leaf))]
    assert sum(n for _, n, _ in extents) == 8 * MIB
    assert ok("map", str(leaf)).strip()


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_import_export_round_trip(sr_dir: Path, fixed: bool) -> None:
    rng = random.Random(4)
    src = bytearray(6 * MIB)
    src[100 : 100 + 300_000] = rng.randbytes(300_000)
    raw = sr_dir / "src.raw"
    raw.write_bytes(src)
    img = sr_dir / "i.vhd"
    ok("import", *(["--fixed"] if fixed else []), str(raw), str(img))
    ok_, why = vp.qemu_compare_raw(img, raw)
    assert ok_, why
    doc = json.loads(ok("info", "--json", str(img)))
    assert doc["disk_type"] == ("fixed" if fixed else "dynamic")
    if not fixed:
        assert doc["allocated_blocks"] == 1
    out = sr_dir / "out.raw"
    ok("export", str(img), str(out))
    assert out.read_bytes() == src


def test_write_and_read_through_the_command(sr_dir: Path) -> None:
    img = sr_dir / "rw.vhd"
    ok("create", str(img), "6M")
    payload = random.Random(8).randbytes(3 * MIB + 17)
    src = sr_dir / "payload.bin"
    src.write_bytes(payload)
    ok("write", "--offset", str(MIB + 5), "--input", str(src), str(img))
    assert vhd.read(str(img), MIB + 5, len(payload)) == payload
    out = sr_dir / "back.bin"
    ok(
        "read",
        "--offset",
        str(MIB + 5),
        "--length",
        str(len(payload)),
        "--output",
        str(out),
        str(img),
    )
    assert out.read_bytes() == payload
    fails("write", "--offset", str(6 * MIB - 2), "--input", str(src), str(img))
    assert vhd.check(str(img)) == []


def test_errors_are_one_line_with_an_exit_code(sr_dir: Path) -> None:
    missing = sr_dir / "missing.vhd"
    line = fails("info", str(missing))
    assert "missing.vhd" in line
    fails("check", str(missing))
    fails("map", str(missing))
    fails("export", str(missing), str(sr_dir / "o.raw"))
    assert not (sr_dir / "o.raw").exists()
    fails("import", str(sr_dir / "no-such.raw"), str(sr_dir / "n.vhd"))
    assert not (sr_dir / "n.vhd").exists()
    # bad sizes are usage errors
    line = fails("create", str(sr_dir / "x.vhd"), "10Q", rc=2)
    assert "size" in line
    fails("create", str(sr_dir / "x.vhd"), "-5M")
    fails("create", str(sr_dir / "x.vhd"), "3000G")
    assert not (sr_dir / "x.vhd").exists()
    # refuse to overwrite
    existing = sr_dir / "e.vhd"
    existing.write_bytes(b"keep me")
    line = fails("create", str(existing), "2M")
    assert "e.vhd" in line
    assert existing.read_bytes() == b"keep me"
    # not an image
    line = fails("info", str(existing))
    assert "e.vhd" in line
    # a damaged image
    img = sr_dir / "d.vhd"
    vhd.create(str(img), 4 * MIB, fixed=True)
    vp.patch(img, vp.layout(img).footer_at, b"XXXXXXXX")
    line = fails("info", str(img))
    assert "d.vhd" in line
    # usage
    fails("frobnicate", rc=2)
    fails("info", rc=2)
    res = vp.run_vhd()
    assert res.returncode != 0 and "Traceback" not in res.stderr
