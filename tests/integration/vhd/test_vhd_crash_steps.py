"""Crash at every step: each operation of ``smcommon.vhd`` killed before each of its
system calls that change a file, in turn, deterministically.

The operation runs in a forked child whose ``os`` functions that write, sync,
link, rename or unlink count their calls; the child SIGKILLs itself just before
call N (the page cache survives, as after a process crash).  For N = 1, 2, ...
until the operation completes, the images left behind must pass ``check``,
show the old or the new state (data: per byte old or new), and the operation
run again must finish with the expected result.  Complements the random-delay
kills of test_vhd_crash.py, which cannot aim at a window between two calls.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import libvhd_style as lv
import pytest
import vhdcorpus as vc
import vhdproof as vp
from smcommon import vhd

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = vp.MIB
STEPPED = (
    "pwrite",
    "pwritev",
    "write",
    "writev",
    "ftruncate",
    "truncate",
    "posix_fallocate",
    "copy_file_range",
    "sendfile",
    "fsync",
    "fdatasync",
    "link",
    "rename",
    "replace",
    "unlink",
)


def run_killed_before(n: int, op: Callable[[], object]) -> int | None:
    """Run ``op`` in a forked child killed just before its n-th counted call.
    Returns the number of counted calls if it finished, None if it was killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(r)
            count = [0]
            for name in STEPPED:
                real = getattr(os, name, None)
                if real is None:
                    continue

                def wrapped(
                    *a: object,
                    _real: Callable[..., object] = real,
                    _name: str = name,
                    **k: object,
                ) -> object:
                    if _name in ("write", "writev") and a and a[0] in (1, 2, w):
                        return _real(*a, **k)
                    count[0] += 1
                    if count[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*a, **k)

                setattr(os, name, wrapped)
            op()
            msg = f"DONE {count[0]}".encode()
            os.write(w, msg)
            status = 0
        except BaseException as exc:  # noqa: BLE001 - report, then leave
            try:
                os.write(w, f"EXC {type(exc).__name__}: {exc}".encode()[:2000])
            except OSError:
                pass
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, st = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    if os.WIFSIGNALED(st):
        assert os.WTERMSIG(st) == signal.SIGKILL
        return None
    assert out.startswith("DONE"), f"the operation failed in the child: {out}"
    return int(out.split()[1])


def either(got: bytes, old: bytes, new: bytes) -> bool:
    """Every byte is the old or the new one (checked per 64 KiB, per byte only where mixed)."""
    if got in (old, new):
        return True
    if len(got) != len(old) or len(old) != len(new):
        return False
    step = 65536
    for i in range(0, len(got), step):
        g, o, n = got[i : i + step], old[i : i + step], new[i : i + step]
        if g in (o, n):
            continue
        if not all(x in (y, z) for x, y, z in zip(g, o, n, strict=True)):
            return False
    return True


def images(d: Path) -> list[str]:
    return sorted(str(p) for p in d.iterdir() if p.suffix == ".vhd")


class Scenario:
    """A directory of images, an operation on them, and what must hold after a kill."""

    size = 8 * MIB

    def setup(self, d: Path) -> None:
        raise NotImplementedError

    def op(self, d: Path) -> None:
        raise NotImplementedError

    def after_kill(self, d: Path) -> None:
        """Checked right after the kill (before the operation is run again)."""

    def after_rerun(self, d: Path) -> None:
        """Checked after the operation ran again to completion."""


def _fill(path: str, seed: int, blocks: list[int], size: int) -> None:
    for b in blocks:
        off = b * vp.BLOCK + 1000
        vhd.write(path, off, vp.pattern(seed + b, min(300_000, size - off)))


class WriteFresh(Scenario):
    off, data = 5 * MIB + 100, vp.pattern(1, 70_000)

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "a.vhd"), self.size)
        _fill(str(d / "a.vhd"), 0, [0], self.size)
        self.old = vhd.read(str(d / "a.vhd"), 0, self.size)
        new = bytearray(self.old)
        vp.apply(new, self.off, self.data)
        self.new = bytes(new)

    def op(self, d: Path) -> None:
        vhd.write(str(d / "a.vhd"), self.off, self.data)

    def after_kill(self, d: Path) -> None:
        assert either(vhd.read(str(d / "a.vhd"), 0, self.size), self.old, self.new)

    def after_rerun(self, d: Path) -> None:
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.new


class WriteAllocated(WriteFresh):
    off, data = 1500, vp.pattern(2, 5000)


class WriteDifferencing(WriteFresh):
    off, data = (
        2 * MIB - 700,
        vp.pattern(3, 2 * MIB),
    )  # straddles two fresh child blocks

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "p.vhd"), self.size)
        _fill(str(d / "p.vhd"), 0, [0, 1, 2], self.size)
        vhd.snapshot(str(d / "p.vhd"), str(d / "a.vhd"))
        self.old = vhd.read(str(d / "a.vhd"), 0, self.size)
        new = bytearray(self.old)
        vp.apply(new, self.off, self.data)
        self.new = bytes(new)


class ResizeGrowBat(Scenario):
    size = 64 * MIB
    grown = 600 * MIB  # needs a BAT of 300 entries: more than its first sector

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "a.vhd"), self.size)
        _fill(str(d / "a.vhd"), 0, list(range(0, 32, 3)), self.size)
        self.data = vhd.read(str(d / "a.vhd"), 0, self.size)

    def op(self, d: Path) -> None:
        vhd.resize(str(d / "a.vhd"), self.grown)

    def after_kill(self, d: Path) -> None:
        assert vhd.info(str(d / "a.vhd")).virtual_size in (self.size, self.grown)
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        assert vhd.info(str(d / "a.vhd")).virtual_size == self.grown
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data
        assert vhd.read(str(d / "a.vhd"), self.grown - MIB, MIB) == bytes(MIB)


class ResizeFixed(ResizeGrowBat):
    size, grown = 8 * MIB, 14 * MIB

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "a.vhd"), self.size, fixed=True)
        _fill(str(d / "a.vhd"), 0, [0, 3], self.size)
        self.data = vhd.read(str(d / "a.vhd"), 0, self.size)


class SetHidden(Scenario):
    def setup(self, d: Path) -> None:
        vhd.create(str(d / "a.vhd"), self.size)
        _fill(str(d / "a.vhd"), 0, [1], self.size)
        self.data = vhd.read(str(d / "a.vhd"), 0, self.size)

    def op(self, d: Path) -> None:
        vhd.set_hidden(str(d / "a.vhd"), True)

    def after_kill(self, d: Path) -> None:
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        assert vhd.info(str(d / "a.vhd")).hidden is True


class SetParent(Scenario):
    def setup(self, d: Path) -> None:
        vhd.create(str(d / "p1.vhd"), self.size)
        _fill(str(d / "p1.vhd"), 0, [0, 2], self.size)
        vhd.snapshot(str(d / "p1.vhd"), str(d / "a.vhd"))
        _fill(str(d / "a.vhd"), 50, [1], self.size)
        shutil.copyfile(d / "p1.vhd", d / "p2.vhd")  # same bytes, same UUID
        self.data = vhd.read(str(d / "a.vhd"), 0, self.size)

    def op(self, d: Path) -> None:
        vhd.set_parent(str(d / "a.vhd"), str(d / "p2.vhd"))

    def after_kill(self, d: Path) -> None:
        parent = Path(vhd.info(str(d / "a.vhd")).parent or "").name
        assert parent in ("p1.vhd", "p2.vhd")
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        assert Path(vhd.info(str(d / "a.vhd")).parent or "").name == "p2.vhd"
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data


class Coalesce(Scenario):
    def setup(self, d: Path) -> None:
        vhd.create(str(d / "p.vhd"), self.size)
        _fill(str(d / "p.vhd"), 0, [0, 1], self.size)
        self.before = vhd.read(str(d / "p.vhd"), 0, self.size)
        vhd.snapshot(str(d / "p.vhd"), str(d / "c.vhd"))
        _fill(str(d / "c.vhd"), 70, [1, 2, 3], self.size)
        vhd.write(str(d / "c.vhd"), 7, b"partly-set sector bitmap")
        self.merged = vhd.read(str(d / "c.vhd"), 0, self.size)

    def op(self, d: Path) -> None:
        vhd.coalesce(str(d / "c.vhd"))

    def after_kill(self, d: Path) -> None:
        assert vhd.read(str(d / "c.vhd"), 0, self.size) == self.merged
        assert either(
            vhd.read(str(d / "p.vhd"), 0, self.size), self.before, self.merged
        )

    def after_rerun(self, d: Path) -> None:
        assert vhd.read(str(d / "p.vhd"), 0, self.size) == self.merged


class Snapshot(Scenario):
    def setup(self, d: Path) -> None:
        vhd.create(str(d / "p.vhd"), self.size)
        _fill(str(d / "p.vhd"), 0, [2], self.size)
        self.data = vhd.read(str(d / "p.vhd"), 0, self.size)

    def op(self, d: Path) -> None:
        if not (d / "s.vhd").exists():
            vhd.snapshot(str(d / "p.vhd"), str(d / "s.vhd"))

    def after_kill(self, d: Path) -> None:
        assert sorted(p.name for p in d.iterdir()) in (["p.vhd"], ["p.vhd", "s.vhd"]), (
            "stray files"
        )
        if (d / "s.vhd").exists():
            assert vhd.read(str(d / "s.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        assert vhd.read(str(d / "s.vhd"), 0, self.size) == self.data


class ImportRaw(Scenario):
    def setup(self, d: Path) -> None:
        raw = bytearray(self.size)
        raw[3 * MIB : 3 * MIB + 500_000] = vp.pattern(9, 500_000)
        (d / "src.raw").write_bytes(raw)
        self.data = bytes(raw)

    def op(self, d: Path) -> None:
        if not (d / "i.vhd").exists():
            vhd.import_raw(str(d / "src.raw"), str(d / "i.vhd"))

    def after_kill(self, d: Path) -> None:
        assert sorted(p.name for p in d.iterdir()) in (
            ["src.raw"],
            ["i.vhd", "src.raw"],
        ), "stray files"
        if (d / "i.vhd").exists():
            assert vhd.read(str(d / "i.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        assert vhd.read(str(d / "i.vhd"), 0, self.size) == self.data


class RepairTail(Scenario):
    def setup(self, d: Path) -> None:
        vhd.create(str(d / "a.vhd"), self.size)
        _fill(str(d / "a.vhd"), 0, [0, 3], self.size)
        self.data = vhd.read(str(d / "a.vhd"), 0, self.size)
        vp.patch(d / "a.vhd", vp.layout(d / "a.vhd").footer_at, b"damaged!")

    def op(self, d: Path) -> None:
        vhd.repair(str(d / "a.vhd"))

    def after_kill(self, d: Path) -> None:
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data


class WriteFillsBlock(Scenario):
    """A differencing block whose bitmap this write completes: its batmap bit."""

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "p.vhd"), self.size)
        vhd.snapshot(str(d / "p.vhd"), str(d / "a.vhd"))
        vhd.write(str(d / "a.vhd"), 4096, vp.pattern(1, vp.BLOCK - 4096))
        self.old = vhd.read(str(d / "a.vhd"), 0, self.size)
        self.new = bytearray(self.old)
        self.new[:4096] = vp.pattern(2, 4096)

    def op(self, d: Path) -> None:
        vhd.write(str(d / "a.vhd"), 0, bytes(self.new[:4096]))

    def after_kill(self, d: Path) -> None:
        assert either(vhd.read(str(d / "a.vhd"), 0, self.size), self.old, bytes(self.new))

    def after_rerun(self, d: Path) -> None:
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.new
        assert lv.load(d / "a.vhd").bmap[0] == 0x80 and lv.problems(d / "a.vhd") == []


class CoalesceFillsParentBlock(Coalesce):
    """Into a differencing parent whose block the child's sectors complete."""

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "b.vhd"), self.size)
        vhd.snapshot(str(d / "b.vhd"), str(d / "p.vhd"))
        vhd.write(str(d / "p.vhd"), 0, vp.pattern(1, 8192))
        self.before = vhd.read(str(d / "p.vhd"), 0, self.size)
        vhd.snapshot(str(d / "p.vhd"), str(d / "c.vhd"))
        vhd.write(str(d / "c.vhd"), 8192, vp.pattern(2, vp.BLOCK - 8192))
        vhd.write(str(d / "c.vhd"), 3 * vp.BLOCK, vp.pattern(3, vp.BLOCK))
        self.merged = vhd.read(str(d / "c.vhd"), 0, self.size)

    def after_rerun(self, d: Path) -> None:
        super().after_rerun(d)
        assert lv.load(d / "p.vhd").bmap[0] == 0x90          # blocks 0 and 3 are full


def _libvhd_chain(d: Path, size: int) -> bytes:
    """base <- child made and written the way blktap does (libvhd's layout:
    locators after the batmap, blocks after them, 4 KiB-aligned data)."""
    lv.create(d / "base.vhd", size)
    lv.write(d / "base.vhd", 0, b"B" * vp.BLOCK)
    lv.write(d / "base.vhd", 3 * vp.BLOCK, b"b" * 4096)
    lv.snapshot(d / "base.vhd", d / "child.vhd")
    lv.write(d / "child.vhd", 4096, b"C" * 8192)
    lv.write(d / "child.vhd", 5 * vp.BLOCK, b"c" * vp.BLOCK)
    return vhd.read(str(d / "child.vhd"), 0, 8 * vp.BLOCK)


class SetParentLibvhd(Scenario):
    """The corpus chain: new locators into libvhd's alignment gap, one header write."""

    def setup(self, d: Path) -> None:
        vc.extract(d)
        for name in ("empty.vhd", "prealloc.vhd"):
            (d / name).unlink()
        shutil.copyfile(d / "child.vhd", d / "child-copy.vhd")

    def op(self, d: Path) -> None:
        vhd.set_parent(str(d / "grandchild.vhd"), str(d / "child-copy.vhd"))

    def after_kill(self, d: Path) -> None:
        assert Path(vhd.info(str(d / "grandchild.vhd")).parent or "").name in (
            "child.vhd", "child-copy.vhd")
        assert vhd.read(str(d / "grandchild.vhd"), 0, 64 * MIB) == vc.model("grandchild.vhd")
        assert lv.read(d / "grandchild.vhd", 0, 64 * MIB) == vc.model("grandchild.vhd")

    def after_rerun(self, d: Path) -> None:
        self.after_kill(d)
        assert Path(vhd.info(str(d / "grandchild.vhd")).parent or "").name == "child-copy.vhd"
        assert lv.problems(d / "grandchild.vhd") == []


class SetParentMakesRoom(Scenario):
    """A libvhd child whose alignment gap (1 KiB: a 1100 MiB disk's five BAT
    sectors) cannot hold the new locators: its first block moves to the end first."""

    size = 1100 * MIB

    def setup(self, d: Path) -> None:
        self.data = _libvhd_chain(d, self.size)
        shutil.copyfile(d / "base.vhd", d / "base-copy.vhd")

    def op(self, d: Path) -> None:
        vhd.set_parent(str(d / "child.vhd"), str(d / "base-copy.vhd"))

    def after_kill(self, d: Path) -> None:
        assert vhd.read(str(d / "child.vhd"), 0, 8 * vp.BLOCK) == self.data
        assert lv.read(d / "child.vhd", 0, 8 * vp.BLOCK) == self.data

    def after_rerun(self, d: Path) -> None:
        self.after_kill(d)
        assert Path(vhd.info(str(d / "child.vhd")).parent or "").name == "base-copy.vhd"
        assert lv.problems(d / "child.vhd") == []


class ResizeGrowBatLibvhd(Scenario):
    """Growing a libvhd child: its locators (after the batmap) and its first
    block move out of the way, the batmap header moves to the new BAT end."""

    grown = 300 * MIB

    def setup(self, d: Path) -> None:
        self.data = _libvhd_chain(d, 64 * MIB)

    def op(self, d: Path) -> None:
        vhd.resize(str(d / "child.vhd"), self.grown)

    def after_kill(self, d: Path) -> None:
        assert vhd.info(str(d / "child.vhd")).virtual_size in (64 * MIB, self.grown)
        assert vhd.read(str(d / "child.vhd"), 0, 8 * vp.BLOCK) == self.data
        assert lv.read(d / "child.vhd", 0, 8 * vp.BLOCK) == self.data

    def after_rerun(self, d: Path) -> None:
        self.after_kill(d)
        assert vhd.info(str(d / "child.vhd")).virtual_size == self.grown
        assert lv.problems(d / "child.vhd") == []
        assert lv.load(d / "child.vhd").bmap[0] == 0x04                 # block 5 full


class ResizeGrowBatOneSector(ResizeGrowBat):
    """The BAT grows by one sector: the new batmap header lands on the old map,
    which is copied away first."""

    grown = 300 * MIB


class RepairForeignBlock(Scenario):
    """A block put where the batmap must be (as qemu's writer does on an image
    with no block yet): repair moves it to the end and rebuilds the batmap."""

    def setup(self, d: Path) -> None:
        vhd.create(str(d / "a.vhd"), self.size)
        lay = vp.layout(d / "a.vhd")
        at = int(lay.header["table_offset"]) + 512  # type: ignore[call-overload]
        raw = bytearray((d / "a.vhd").read_bytes()[:at])
        block = b"\xff" * 512 + vp.pattern(4, vp.BLOCK)        # all-ones bitmap, then data
        raw[at:] = block
        raw += raw[:512]                                       # the footer after the block
        (d / "a.vhd").write_bytes(bytes(raw))
        vp.set_bat_entry(d / "a.vhd", 1, at // 512)
        self.data = vhd.read(str(d / "a.vhd"), 0, self.size)
        assert any("qemu" in p for p in vhd.check(str(d / "a.vhd")))

    def op(self, d: Path) -> None:
        vhd.repair(str(d / "a.vhd"))

    def after_kill(self, d: Path) -> None:
        assert vhd.read(str(d / "a.vhd"), 0, self.size) == self.data

    def after_rerun(self, d: Path) -> None:
        self.after_kill(d)
        assert lv.problems(d / "a.vhd") == [] and lv.load(d / "a.vhd").bmap[0] == 0x40


SCENARIOS: dict[str, type[Scenario]] = {
    "write-fresh-block": WriteFresh,
    "write-allocated-block": WriteAllocated,
    "write-differencing": WriteDifferencing,
    "resize-grow-bat": ResizeGrowBat,
    "resize-fixed": ResizeFixed,
    "set-hidden": SetHidden,
    "set-parent": SetParent,
    "coalesce": Coalesce,
    "snapshot": Snapshot,
    "import-raw": ImportRaw,
    "repair-tail-footer": RepairTail,
    "write-fills-block": WriteFillsBlock,
    "coalesce-fills-parent-block": CoalesceFillsParentBlock,
    "set-parent-libvhd": SetParentLibvhd,
    "set-parent-makes-room": SetParentMakesRoom,
    "resize-grow-bat-libvhd": ResizeGrowBatLibvhd,
    "resize-grow-bat-one-sector": ResizeGrowBatOneSector,
    "repair-foreign-block": RepairForeignBlock,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_killed_before_each_step(tmp_path: Path, name: str) -> None:
    sc = SCENARIOS[name]()
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    sc.setup(pristine)
    damaged_before = name.startswith("repair")   # check is clean only once repaired
    n, total = 1, None
    while total is None:
        work = tmp_path / f"step{n}"
        shutil.copytree(pristine, work)
        total = run_killed_before(n, lambda w=work: sc.op(w))  # type: ignore[misc]
        where = (
            f"{name}, killed before call {n}" if total is None else f"{name}, completed"
        )
        try:
            if not damaged_before or total is not None:
                for img in images(work):
                    problems = vhd.check(img)
                    assert problems == [], f"{where}: {Path(img).name}: {problems}"
                    if vp.layout(img).footer["disk_type"] != vp.DISK_FIXED:
                        # the tests' own libvhd-rules checker agrees (the footer copy
                        # may be stale between two footer writes: libvhd opens by the tail)
                        problems = lv.problems(img, footer_copy=False)
                        assert problems == [], f"{where}: {Path(img).name}: {problems}"
            sc.after_kill(work)
            sc.op(work)  # run again to the end
            for img in images(work):
                assert vhd.check(img) == [], (
                    f"{where}, re-run: {Path(img).name}: {vhd.check(img)}"
                )
            sc.after_rerun(work)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        shutil.rmtree(work)
        n += 1
        assert n < 400, "the operation never completed"
    assert total >= 2 and n - 1 == total + 1, (
        f"{name}: {total} counted calls: the stepping proved little"
    )
