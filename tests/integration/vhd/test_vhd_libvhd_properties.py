"""Property tests: every operation over images laid out the way libvhd lays them out.

Hypothesis generates a chain made by the libvhd-style writer of
tests/libvhd_style.py (blktap's layout: locators after the batmap with their
space in bytes or in sectors, blocks after the locators with their data on a
4 KiB boundary, stale bytes between the metadata and the first block, batmap
bits set for full blocks and clear for partial ones; disk sizes chosen so the
gap after the locators ranges from none to several KiB), then runs a random
sequence of operations over it: our writes and tapdisk's (libvhd-style)
writes, snapshot, coalesce with the GC's re-link (set_parent), re-link onto a
copy of the parent, resize across BAT growth, set_hidden, repair, convert and
export.  After every step each image of
the chain reads as its model (through the library and through the libvhd-style
reader) and both libvhd-rules checkers accept it.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import libvhd_style as lv
import pytest
import vhdproof as vp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from smcommon import vhd

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = vp.MIB
WINDOW = 12 * MIB              # writes land here; the model covers it
# virtual sizes of 1, 3, 4, 5, 6 and 7 BAT sectors: the space between libvhd's
# locators (512 bytes each) and its first, 4 KiB-aligned, block is then 3 KiB,
# 2 KiB, 1.5 KiB, 1 KiB, 512 bytes and none (re-linking must move a block)
SIZES = [64 * MIB, 600 * MIB, 1000 * MIB, 1100 * MIB, 1300 * MIB, 1700 * MIB]
MAX_DEPTH = 4


def tagged(first: int, count: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(count * 512)


class LibvhdChain(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="libvhdprop-"))
        self.count = 0
        self.chain: list[Path] = []
        self.models: dict[Path, bytearray] = {}
        self.sizes: dict[Path, int] = {}

    def _name(self) -> Path:
        self.count += 1
        return self.dir / f"v{self.count}.vhd"

    def _tapdisk(self, path: Path, first: int, count: int, seed: int) -> None:
        data = tagged(first, count, seed)
        lv.write(path, first * 512, data)
        self.models[path][first * 512 : first * 512 + len(data)] = data

    def _stale(self, path: Path, seed: int) -> None:
        """Random bytes in the unreferenced space between the metadata and the first block."""
        img = lv.load(path)
        starts = [b * 512 for b in img.bat[: img.live()] if b != lv.UNUSED]
        lo, hi = img.eoh(), min(starts, default=img.eoh())
        if hi > lo:
            vp.patch(path, lo, random.Random(seed).randbytes(hi - lo))

    @initialize(size=st.sampled_from(SIZES), sectors=st.booleans(), slack=st.integers(0, 2),
                full=st.lists(st.integers(0, WINDOW // vp.BLOCK - 1), max_size=2),
                partial=st.lists(st.tuples(st.integers(0, WINDOW // 512 - 64),
                                           st.integers(1, 64)), min_size=1, max_size=4),
                stale=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def build(self, size: int, sectors: bool, slack: int, full: list[int],
              partial: list[tuple[int, int]], stale: bool, seed: int) -> None:
        base, child = self._name(), self._name()
        lv.create(base, size)
        self.models[base] = bytearray(WINDOW)
        for b in full:                                     # whole blocks: batmap bits set
            self._tapdisk(base, b * 4096, 4096, seed + b)
        for i, (first, count) in enumerate(partial):
            self._tapdisk(base, first, count, seed + 100 + i)
        lv.snapshot(base, child, sectors=sectors, slack=slack)
        self.models[child] = bytearray(self.models[base])
        for i, (first, count) in enumerate(reversed(partial)):
            self._tapdisk(child, first + 7, min(count, 50), seed + 200 + i)
        if stale:
            self._stale(child, seed)
        self.chain = [base, child]
        self.sizes = {base: size, child: size}

    @property
    def leaf(self) -> Path:
        return self.chain[-1]

    @rule(where=st.integers(0, WINDOW - 1), length=st.integers(1, 3 * MIB),
          seed=st.integers(0, 2**32 - 1))
    def our_write(self, where: int, length: int, seed: int) -> None:
        length = min(length, WINDOW - where)
        data = vp.pattern(seed, length)
        vhd.write(str(self.leaf), where, data)
        self.models[self.leaf][where : where + length] = data

    @rule(first=st.integers(0, WINDOW // 512 - 1), count=st.integers(1, 5000),
          seed=st.integers(0, 2**32 - 1))
    def tapdisk_write(self, first: int, count: int, seed: int) -> None:
        self._tapdisk(self.leaf, first, min(count, WINDOW // 512 - first), seed)

    @precondition(lambda self: len(self.chain) < MAX_DEPTH)
    @rule()
    def snapshot(self) -> None:
        child = self._name()
        vhd.snapshot(str(self.leaf), str(child))
        self.models[child] = bytearray(self.models[self.leaf])
        self.sizes[child] = self.sizes[self.leaf]
        self.chain.append(child)

    @precondition(lambda self: len(self.chain) >= 2)
    @rule(data=st.data())
    def coalesce(self, data: st.DataObject) -> None:
        """What the collector does: copy a child into its parent, re-link the
        grandchild to the parent, drop the child."""
        i = data.draw(st.integers(1, len(self.chain) - 1), label="child index")
        child, parent = self.chain[i], self.chain[i - 1]
        vhd.coalesce(str(child))
        self.models[parent] = bytearray(self.models[child])
        self.sizes[parent] = max(self.sizes[parent], self.sizes[child])
        if i + 1 < len(self.chain):
            vhd.set_parent(str(self.chain[i + 1]), str(parent))
        del self.chain[i]
        child.unlink()

    @precondition(lambda self: len(self.chain) >= 2)
    @rule(data=st.data())
    def relink_to_a_copy(self, data: st.DataObject) -> None:
        """set_parent onto a copy of the parent (same UUID, another name), as
        the GC's re-link does: the new locators need free space in the image,
        libvhd's included, whatever its alignment gap."""
        i = data.draw(st.integers(1, len(self.chain) - 1), label="child index")
        old = self.chain[i - 1]
        copy = self._name()
        shutil.copyfile(old, copy)
        vhd.set_parent(str(self.chain[i]), str(copy))
        self.models[copy], self.sizes[copy] = self.models.pop(old), self.sizes.pop(old)
        self.chain[i - 1] = copy
        old.unlink()

    @rule(grow=st.sampled_from([2 * MIB, 300 * MIB, 1100 * MIB]))
    def resize(self, grow: int) -> None:
        new = self.sizes[self.leaf] + grow
        vhd.resize(str(self.leaf), new)
        self.sizes[self.leaf] = new

    @rule(hidden=st.booleans())
    def set_hidden(self, hidden: bool) -> None:
        vhd.set_hidden(str(self.leaf), hidden)

    @rule()
    def repair_finds_nothing(self) -> None:
        assert vhd.repair(str(self.leaf)) == []

    @rule()
    def convert_and_export(self) -> None:
        flat, raw = self.dir / "flat.vhd", self.dir / "disk.raw"
        vhd.convert(str(self.leaf), str(flat))
        assert vhd.check(str(flat)) == [] and lv.problems(flat) == []
        assert vhd.read(str(flat), 0, WINDOW) == self.models[self.leaf]
        assert lv.read(flat, 0, WINDOW) == self.models[self.leaf]
        vhd.export_raw(str(self.leaf), str(raw))
        with open(raw, "rb") as f:
            assert f.read(WINDOW) == self.models[self.leaf]
        assert raw.stat().st_size == self.sizes[self.leaf]
        flat.unlink()
        raw.unlink()

    @invariant()
    def every_image_reads_as_its_model_and_is_sound(self) -> None:
        for path in self.chain:
            model = self.models[path]
            assert vhd.info(str(path)).virtual_size == self.sizes[path]
            assert vhd.read(str(path), 0, WINDOW) == model, f"{path.name} differs"
            assert lv.read(path, 0, WINDOW) == model, f"{path.name}: libvhd reads otherwise"
            end = self.sizes[path]
            assert vhd.read(str(path), end - MIB, MIB) == bytes(MIB)
            assert vhd.check(str(path)) == [], f"{path.name}: {vhd.check(str(path))}"
            assert lv.problems(path) == [], f"{path.name}: {lv.problems(path)}"

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


LibvhdChain.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_libvhd_layout_machine = LibvhdChain.TestCase
