"""Fuzzing the VHD parser of ``smcommon.vhd`` (bounded, deterministic seed).

Valid images (fixed, dynamic, differencing with its parent beside it) are copied
and damaged: bytes and fields of the footer (both copies), dynamic header, BAT,
parent locators and sector bitmaps, with and without a fixed-up checksum (so the
damage gets past the checksum), and truncation at random points.  Every
read-side operation (info, chain, check, allocation_map, read, export_raw) runs
(and then a write and a repair) on each case in a worker process (``vhdproof_fuzz.py``) with an alarm per
operation and a memory cap: each must succeed or raise a ``smcommon.errors.Error``
with a one-line message -- never another exception, never a hang.

Then targeted cases with precise expectations: truncation, BAT entries past the
end of the file, overlapping BAT entries, absurd max_table_entries and block
sizes, bad checksums, a parent loop, and parent locators that lead outside the
child's directory (the outside file must never be opened: inotify watches it).
Damaged parents under intact children are fuzzed too.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import vhdproof as vp
from smcommon import errors, vhd

pytestmark = pytest.mark.integration

MIB = vp.MIB
WORKER = Path(__file__).resolve().parent / "vhdproof_fuzz.py"
SEED = 20261125
CASES_PER_BASE = 50

U32 = [0, 1, 2, 3, 511, 512, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
U64 = [0, 1, 511, 512, 2**31, 2**32, 2**63, 2**64 - 1]
FOOTER_FIELDS = {
    "features": "I",
    "version": "I",
    "data_offset": "Q",
    "timestamp": "I",
    "original_size": "Q",
    "current_size": "Q",
    "geometry": "I",
    "disk_type": "I",
    "saved_state": "B",
    "hidden": "B",
}
HEADER_FIELDS = {
    "data_offset": "Q",
    "table_offset": "Q",
    "header_version": "I",
    "max_table_entries": "I",
    "block_size": "I",
    "parent_timestamp": "I",
}


def _bases(d: Path) -> dict[str, Path]:
    rng = random.Random(1)
    fixed, dyn, parent, child = (
        d / n for n in ("fixed.vhd", "dyn.vhd", "parent.vhd", "child.vhd")
    )
    vhd.create(str(fixed), 4 * MIB, fixed=True)
    vhd.write(str(fixed), 1000, rng.randbytes(5000))
    vhd.create(str(dyn), 8 * MIB)
    for off in (0, 3 * MIB - 7, 7 * MIB):
        vhd.write(str(dyn), off, rng.randbytes(70_000))
    vhd.create(str(parent), 8 * MIB)
    vhd.write(str(parent), 2 * MIB + 5, rng.randbytes(100_000))
    vhd.snapshot(str(parent), str(child))
    vhd.write(str(child), 2 * MIB + 1000, rng.randbytes(3000))
    vhd.write(str(child), 6 * MIB, rng.randbytes(4096))
    return {"fixed": fixed, "dyn": dyn, "parent": parent, "child": child}


def _value(rng: random.Random, fmt: str, file_size: int) -> int:
    if fmt == "B":
        return rng.choice([0, 1, 2, 0xFF, rng.randrange(256)])
    if fmt == "I":
        return rng.choice([*U32, rng.getrandbits(32), (file_size // 512) & 0xFFFFFFFF])
    return rng.choice(
        [*U64, rng.getrandbits(64), file_size, file_size - 512, file_size + 512]
    )


def _flip(path: Path, rng: random.Random, start: int, length: int, count: int) -> str:
    spots = []
    with open(path, "r+b") as f:
        for _ in range(count):
            at = start + rng.randrange(length)
            f.seek(at)
            old = f.read(1)
            new = bytes(
                [
                    (old[0] ^ (1 << rng.randrange(8)))
                    if rng.random() < 0.5
                    else rng.randrange(256)
                ]
            )
            f.seek(at)
            f.write(new)
            spots.append(f"{at}:{old.hex()}->{new.hex()}")
    return ",".join(spots)


def mutate(path: Path, rng: random.Random) -> str:
    """Damage ``path`` in one random way; returns what was done (for the failure report)."""
    lay = vp.layout(path)
    dynamic = lay.header is not None
    kinds = ["footer_bytes", "footer_field", "truncate", "append"]
    if dynamic:
        kinds += [
            "header_bytes",
            "header_field",
            "header_field",
            "bat",
            "bat",
            "locator",
            "bitmap",
            "meta_bytes",
        ]
    kind = rng.choice(kinds)
    fix = rng.random() < 0.75
    if kind == "footer_bytes":
        at = rng.choice([lay.footer_at, 0]) if dynamic else lay.footer_at
        what = _flip(path, rng, at, 512, rng.randint(1, 4))
        if fix:
            vp.fix_footer_checksum(path, at)
        return f"footer@{at} bytes {what} fix={fix}"
    if kind == "footer_field":
        field, fmt = rng.choice(sorted(FOOTER_FIELDS.items()))
        value = _value(rng, fmt, lay.size)
        vp.set_footer_field(path, field, fmt, value)
        return f"footer.{field}={value}"
    if kind == "truncate":
        cut = rng.choice(
            [
                rng.randrange(lay.size),
                lay.size - rng.randint(1, 1024),
                rng.randrange(4096),
            ]
        )
        os.truncate(path, cut)
        return f"truncate to {cut} of {lay.size}"
    if kind == "append":
        n = rng.choice([1, 511, 512, 1024, 4096])
        with open(path, "ab") as f:
            f.write(rng.randbytes(n))
        return f"append {n} random bytes"
    assert lay.header is not None and lay.header_at is not None
    if kind == "header_bytes":
        what = _flip(path, rng, lay.header_at, 1024, rng.randint(1, 4))
        if fix:
            vp.fix_header_checksum(path, lay.header_at)
        return f"header bytes {what} fix={fix}"
    if kind == "header_field":
        field, fmt = rng.choice(sorted(HEADER_FIELDS.items()))
        value = _value(rng, fmt, lay.size)
        vp.set_header_field(path, field, fmt, value)
        return f"header.{field}={value}"
    if kind == "bat":
        done = []
        used = [i for i, e in enumerate(lay.bat) if e != vp.UNUSED]
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lay.bat))
            choice = rng.random()
            if choice < 0.3 and used:
                value = lay.bat[rng.choice(used)]  # overlap another block
            elif choice < 0.5:
                value = lay.size // 512 + rng.randint(
                    -8, 8
                )  # around the end of the file
            else:
                value = _value(rng, "I", lay.size)
            vp.set_bat_entry(path, i, value)
            done.append(f"bat[{i}]={value}")
        return " ".join(done)
    if kind == "locator":
        locs = [
            loc for loc in lay.locators if loc["code"] != b"\0\0\0\0"
        ] or lay.locators
        loc = rng.choice(locs)
        if rng.random() < 0.4 and loc["code"] != b"\0\0\0\0":
            what = _flip(
                path,
                rng,
                int(loc["offset"]),
                max(1, int(loc["length"])),
                rng.randint(1, 6),
            )  # type: ignore[call-overload]
            return f"locator {loc['index']} data {what}"
        entry = lay.header_at + 576 + int(loc["index"]) * 24  # type: ignore[call-overload]
        fld = rng.choice([(0, "4s"), (4, "I"), (8, "I"), (16, "Q")])
        if fld[1] == "4s":
            lvalue: int | bytes = rng.choice(
                [b"W2ru", b"W2ku", b"MacX", b"Wi2r", b"\0\0\0\0", rng.randbytes(4)]
            )
        else:
            lvalue = _value(rng, fld[1], lay.size)
        vp.patch(path, entry + fld[0], struct.pack(">" + fld[1], lvalue))
        vp.fix_header_checksum(path, lay.header_at)
        return f"locator {loc['index']} +{fld[0]} = {lvalue!r}"
    if kind == "bitmap":
        used = [e for e in lay.bat if e != vp.UNUSED]
        if not used:
            return "no block to damage"
        at = rng.choice(used) * 512
        return "bitmap " + _flip(path, rng, at, 512, rng.randint(1, 8))
    # meta_bytes: anywhere before the first data block
    used = [e for e in lay.bat if e != vp.UNUSED]
    end = min(used) * 512 if used else lay.size
    what = _flip(path, rng, 0, max(1, end), rng.randint(1, 16))
    vp.fix_header_checksum(path, lay.header_at)
    vp.fix_footer_checksum(path, lay.footer_at)
    return f"metadata bytes {what} (checksums fixed)"


def run_worker(
    tmp: Path, cases: list[dict[str, str]]
) -> dict[str, list[dict[str, str]]]:
    cases_file, result_file = tmp / "cases.json", tmp / "result.json"
    cases_file.write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(cases_file), str(result_file)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    results = json.loads(result_file.read_text()) if result_file.exists() else {}
    assert proc.returncode == 0, (
        f"fuzz worker died (rc {proc.returncode}) after {len(results)} cases: {proc.stderr[-3000:]}"
    )
    assert len(results) == len(cases)
    return results  # type: ignore[no-any-return]


def _bad_outcomes(
    results: dict[str, list[dict[str, str]]], what: dict[str, str]
) -> list[str]:
    bad = []
    for name, ops in results.items():
        for rec in ops:
            if rec["outcome"] in ("crash", "hang"):
                bad.append(
                    f"{name} [{what.get(name, '')}] {rec['op']}: {rec['outcome']} {rec.get('cls', '')} {rec['detail'][-600:]}"
                )
            elif rec["outcome"] == "error" and (
                not rec["detail"].strip() or "\n" in rec["detail"]
            ):
                bad.append(
                    f"{name} [{what.get(name, '')}] {rec['op']}: error message not one clear line: {rec['detail']!r}"
                )
    return bad


@pytest.mark.slow
def test_random_damage_never_crashes_or_hangs(tmp_path: Path) -> None:
    d = tmp_path / "sr"
    d.mkdir()
    bases = _bases(d)
    rng = random.Random(SEED)
    cases, what = [], {}
    for kind, base in bases.items():
        for i in range(CASES_PER_BASE):
            name = f"f{i:03d}-{kind}"
            path = d / f"{name}.vhd"
            shutil.copyfile(base, path)
            what[name] = mutate(path, rng)
            cases.append({"name": name, "path": str(path)})
    # an intact child over a damaged parent: each pair in its own directory
    for i in range(CASES_PER_BASE):
        name = f"f{i:03d}-under"
        pair = tmp_path / name
        pair.mkdir()
        shutil.copyfile(bases["parent"], pair / "parent.vhd")
        shutil.copyfile(bases["child"], pair / "child.vhd")
        what[name] = "parent: " + mutate(pair / "parent.vhd", rng)
        cases.append({"name": name, "path": str(pair / "child.vhd")})
    results = run_worker(tmp_path, cases)
    bad = _bad_outcomes(results, what)
    assert not bad, f"{len(bad)} bad outcomes:\n" + "\n".join(bad[:25])
    # the fuzzing reached past the first checks: some cases still open
    opened = sum(1 for ops in results.values() if ops[0]["outcome"] == "ok")
    refused = sum(1 for ops in results.values() if ops[0]["outcome"] == "error")
    assert opened > 10 and refused > 10, (opened, refused)


# --- targeted cases --------------------------------------------------------------


def _outcomes(
    results: dict[str, list[dict[str, str]]], name: str
) -> dict[str, dict[str, str]]:
    return {rec["op"]: rec for rec in results[name]}


def _targeted(
    tmp_path: Path,
) -> tuple[Path, dict[str, Path], list[dict[str, str]], dict[str, str]]:
    d = tmp_path / "sr"
    d.mkdir()
    bases = _bases(d)
    cases: list[dict[str, str]] = []
    what: dict[str, str] = {}

    def case(name: str, base: str) -> Path:
        path = d / f"{name}.vhd"
        shutil.copyfile(bases[base], path)
        cases.append({"name": name, "path": str(path)})
        return path

    dyn_lay = vp.layout(bases["dyn"])
    used = [i for i, e in enumerate(dyn_lay.bat) if e != vp.UNUSED]
    for cut in (0, 100, 511, 512, 1024 + 300, dyn_lay.size // 2, dyn_lay.size - 1):
        os.truncate(case(f"trunc-dyn-{cut}", "dyn"), cut)
    os.truncate(case("trunc-fixed", "fixed"), 3 * MIB)
    p = case("bat-past-eof", "dyn")
    vp.set_bat_entry(p, used[0], dyn_lay.size // 512 + 4096)
    p = case("bat-overlap", "dyn")
    vp.set_bat_entry(p, used[1], dyn_lay.bat[used[0]])
    p = case("bat-into-header", "dyn")
    vp.set_bat_entry(p, used[0], 1)
    for v in (0xFFFFFFFF, 0x7FFFFFFF, 0):
        vp.set_header_field(
            case(f"max-entries-{v}", "dyn"), "max_table_entries", "I", v
        )
    for v in (0, 3, 2**31, 0xFFFFFFFF):
        vp.set_header_field(case(f"block-size-{v}", "dyn"), "block_size", "I", v)
    p = case("bad-footer-checksum-fixed", "fixed")
    vp.patch(p, vp.layout(p).footer_at + vp.FOOTER_CHECKSUM_AT, b"\xde\xad\xbe\xef")
    p = case("bad-footer-checksum-both", "dyn")
    for at in (0, dyn_lay.footer_at):
        vp.patch(p, at + vp.FOOTER_CHECKSUM_AT, b"\xde\xad\xbe\xef")
    p = case("bad-tail-footer-checksum", "dyn")
    vp.patch(p, dyn_lay.footer_at + vp.FOOTER_CHECKSUM_AT, b"\xde\xad\xbe\xef")
    p = case("bad-header-checksum", "dyn")
    assert dyn_lay.header_at is not None
    vp.patch(p, dyn_lay.header_at + vp.HEADER_CHECKSUM_AT, b"\xde\xad\xbe\xef")
    p = case("current-size-huge", "dyn")
    vp.set_footer_field(p, "current_size", "Q", 2**63)
    return d, bases, cases, what


def test_targeted_damage_is_refused_by_name(tmp_path: Path) -> None:
    _, _, cases, what = _targeted(tmp_path)
    results = run_worker(tmp_path, cases)
    bad = _bad_outcomes(results, what)
    assert not bad, "\n".join(bad)
    problems = []

    def refused(name: str, *ops: str) -> None:
        got = _outcomes(results, name)
        for op in ops:
            if got[op]["outcome"] != "error":
                problems.append(
                    f"{name}: {op} should fail with a VhdError, got {got[op]['outcome']}: {got[op]['detail'][:200]}"
                )

    def refused_or_reported(name: str) -> None:
        """info refuses the image, or check() names at least one problem."""
        got = _outcomes(results, name)
        if got["info"]["outcome"] == "error":
            return
        if got["check"]["outcome"] == "error" or (
            got["check"]["outcome"] == "ok" and got["check"]["detail"] != "[]"
        ):
            return
        problems.append(
            f"{name}: opens and check() finds nothing ({got['check']['detail'][:200]})"
        )

    for c in cases:
        name = c["name"]
        if name.startswith("trunc-dyn-") and int(name.rsplit("-", 1)[1]) < 512:
            refused(name, "info", "read_head", "check")
        elif name.startswith(("trunc", "bat-", "bad-tail")):
            refused_or_reported(name)
        elif name.startswith(
            (
                "max-entries",
                "block-size",
                "bad-footer-checksum",
                "bad-header",
                "current-size",
            )
        ):
            refused(name, "info", "read_head")
    # a block whose data lies past the end of the file must not read as data (nor silently as zeros)
    refused("bat-past-eof", "read_head")
    assert not problems, "\n".join(problems)


def _uuid_of(path: Path) -> bytes:
    u = vp.layout(path).footer["uuid"]
    assert isinstance(u, bytes)
    return u


def test_parent_loop_is_refused(sr_dir: Path) -> None:
    a, b, c = (sr_dir / f"{n}.vhd" for n in "abc")
    vhd.create(str(c), 4 * MIB)
    vhd.snapshot(str(c), str(b))
    vhd.snapshot(str(b), str(a))
    vp.relink_by_hand(
        b, "./a.vhd", parent_uuid=_uuid_of(a)
    )  # b's parent is now a: a loop
    for op in (vhd.info, vhd.chain, vhd.check, lambda p: vhd.read(p, 0, 512)):
        for img in (a, b):
            try:
                result = op(str(img))
            except vhd.VhdError as exc:
                assert "loop" in str(exc).lower() or "ancestor" in str(exc).lower(), (
                    str(exc)
                )
            else:
                assert op is vhd.check and result, (
                    f"{op} on a looped chain returned {result!r}"
                )
    # a self loop too
    vp.relink_by_hand(a, "./a.vhd", parent_uuid=_uuid_of(a))
    with pytest.raises(vhd.VhdError):
        vhd.info(str(a))


IN_ACCESS, IN_OPEN = 0x1, 0x20


class OpenWatch:
    """inotify on one file: did anything open or read it?"""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = self.libc.inotify_add_watch(
            self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS
        )
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> int:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return 0
        return len(data) // 16 if data else 0

    def close(self) -> None:
        os.close(self.fd)


def test_inotify_watch_sees_an_open(tmp_path: Path) -> None:
    """The watch used below works: a plain open is seen."""
    f = tmp_path / "x"
    f.write_bytes(b"x")
    w = OpenWatch(f)
    assert w.events() == 0
    f.read_bytes()
    assert w.events() >= 1
    w.close()


@pytest.mark.parametrize(
    "how", ["dotdot", "absolute", "symlink", "etc-passwd-rel", "etc-passwd-abs"]
)
def test_parent_outside_the_directory_is_refused_unopened(
    tmp_path: Path, how: str
) -> None:
    sr = tmp_path / "sr"
    outside = tmp_path / "outside"
    sr.mkdir()
    outside.mkdir()
    parent, child = sr / "p.vhd", sr / "child.vhd"
    vhd.create(str(parent), 4 * MIB)
    vhd.write(str(parent), 0, b"secret" * 100)
    vhd.snapshot(str(parent), str(child))
    moved = outside / "p.vhd"
    shutil.move(str(parent), moved)
    target = {
        "dotdot": "../outside/p.vhd",
        "absolute": str(moved),
        "symlink": "./p.vhd",
        "etc-passwd-rel": "../" * 12 + "etc/passwd",
        "etc-passwd-abs": "/etc/passwd",
    }[how]
    if how == "symlink":
        os.symlink(moved, parent)
    vp.relink_by_hand(child, target)
    watch = OpenWatch(moved)
    try:
        for op in (vhd.info, vhd.chain, lambda p: vhd.read(p, 0, 600), vhd.check):
            try:
                result = op(str(child))
            except errors.Error as exc:
                assert str(exc).strip()
            else:
                assert op is vhd.check and result, (
                    f"{how}: {op} followed a parent outside the SR: {result!r}"
                )
        with pytest.raises(vhd.VhdError):
            vhd.info(str(child))
        assert watch.events() == 0, (
            f"{how}: the library opened the file outside the child's directory"
        )
    finally:
        watch.close()


@pytest.mark.parametrize("where", ["footer", "header"])
def test_unknown_major_version_is_refused(sr_dir: Path, where: str) -> None:
    """The spec changes the major version only for an incompatible format."""
    img = sr_dir / "v.vhd"
    vhd.create(str(img), 4 * MIB)
    if where == "footer":
        vp.set_footer_field(img, "version", "I", 0x00020000)
    else:
        vp.set_header_field(img, "header_version", "I", 0x00020000)
    try:
        vhd.info(str(img))
    except vhd.VhdError as exc:
        assert "version" in str(exc).lower(), str(exc)
        return
    problems = vhd.check(str(img))
    assert problems, f"a {where} of format version 2.0 opens and check() finds nothing"


def test_size_not_a_sector_multiple_is_reported(sr_dir: Path) -> None:
    img = sr_dir / "s.vhd"
    vhd.create(str(img), 4 * MIB)
    vp.set_footer_field(img, "current_size", "Q", 1000)
    try:
        vhd.info(str(img))
    except vhd.VhdError:
        return
    assert vhd.check(str(img)), "a 1000-byte disk (not whole sectors) passes check()"


def test_library_never_links_a_child_to_a_parent_outside_its_directory(
    tmp_path: Path,
) -> None:
    sr, out = tmp_path / "sr", tmp_path / "out"
    sr.mkdir()
    out.mkdir()
    vhd.create(str(out / "p.vhd"), 4 * MIB)
    vhd.create(str(sr / "p.vhd"), 4 * MIB)
    vhd.snapshot(str(sr / "p.vhd"), str(sr / "c.vhd"))
    with pytest.raises(vhd.ParentNotAllowed):
        vhd.snapshot(str(out / "p.vhd"), str(sr / "c2.vhd"))
    assert not (sr / "c2.vhd").exists()
    with pytest.raises(vhd.ParentNotAllowed):
        vhd.set_parent(str(sr / "c.vhd"), str(out / "p.vhd"))
    assert (
        Path(vhd.info(str(sr / "c.vhd")).parent or "").resolve()
        == (sr / "p.vhd").resolve()
    )
    assert sorted(p.name for p in sr.iterdir()) == ["c.vhd", "p.vhd"]
