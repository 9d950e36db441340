"""Property tests of ``smcommon.vhd`` against an in-memory model (hypothesis, bounded).

A state machine keeps a linear chain root <- ... <- leaf and one bytearray per
image (the bytes that image shows).  Rules: random writes to the leaf, snapshot
(a new empty leaf), coalesce of any child into its parent followed by the GC's
re-link of the grandchild (``set_parent``) and removal of the coalesced image,
and resize (grow) of the leaf.  After every step every image of the chain must
read back equal to its model and ``check`` must find nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

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
BASE_SIZE = 8 * MIB
MAX_SIZE = 16 * MIB
MAX_DEPTH = 5


class ChainMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vhdprop-"))
        self.count = 0
        self.chain: list[str] = []
        self.models: dict[str, bytearray] = {}

    def _name(self) -> str:
        self.count += 1
        return str(self.dir / f"v{self.count}.vhd")

    @initialize(grow_room=st.booleans())
    def create(self, grow_room: bool) -> None:
        base = self._name()
        info = vhd.create(base, BASE_SIZE, max_size=MAX_SIZE if grow_room else None)
        assert info.virtual_size == BASE_SIZE
        self.chain = [base]
        self.models = {base: bytearray(BASE_SIZE)}

    @property
    def leaf(self) -> str:
        return self.chain[-1]

    @rule(
        where=st.floats(0, 1),
        length=st.integers(1, 3 * MIB),
        seed=st.integers(0, 2**32 - 1),
    )
    def write(self, where: float, length: int, seed: int) -> None:
        model = self.models[self.leaf]
        length = min(length, len(model))
        off = int(where * (len(model) - length))
        data = vp.pattern(seed, length)
        vhd.write(self.leaf, off, data)
        vp.apply(model, off, data)

    @precondition(lambda self: 0 < len(self.chain) < MAX_DEPTH)
    @rule()
    def snapshot(self) -> None:
        child = self._name()
        info = vhd.snapshot(self.leaf, child)
        assert info.depth == len(self.chain) + 1
        assert info.virtual_size == len(self.models[self.leaf])
        self.models[child] = bytearray(self.models[self.leaf])
        self.chain.append(child)

    @precondition(lambda self: len(self.chain) >= 2)
    @rule(data=st.data())
    def coalesce(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(1, len(self.chain) - 1), label="child index")
        child, parent = self.chain[i], self.chain[i - 1]
        csize, psize = len(self.models[child]), len(self.models[parent])
        if csize > psize:  # a GC grows the parent first
            vhd.resize(parent, csize)
        copied = vhd.coalesce(child)
        assert 0 <= copied <= csize
        self.models[parent] = bytearray(self.models[child])
        if i + 1 < len(self.chain):
            vhd.set_parent(self.chain[i + 1], parent)
            assert vhd.info(self.chain[i + 1]).parent_uuid == vhd.info(parent).uuid
        del self.chain[i]
        del self.models[child]
        Path(child).unlink()

    @precondition(lambda self: len(self.chain) > 0)
    @rule(extra_blocks=st.integers(1, 4), odd=st.integers(0, 4095))
    def grow(self, extra_blocks: int, odd: int) -> None:
        model = self.models[self.leaf]
        new = min(MAX_SIZE, len(model) + extra_blocks * vp.BLOCK - odd)
        if new <= len(model):
            return
        info = vhd.resize(self.leaf, new)
        assert info.virtual_size == vp.round_up(new, vp.BLOCK)
        model.extend(bytes(info.virtual_size - len(model)))

    @invariant()
    def every_image_reads_as_its_model(self) -> None:
        for depth, path in enumerate(self.chain):
            model = self.models[path]
            assert vhd.info(path).virtual_size == len(model)
            assert vhd.read(path, 0, len(model)) == model, (
                f"{Path(path).name} (level {depth}) differs"
            )
        assert [Path(x).resolve() for x in vhd.chain(self.leaf)] == [
            Path(x).resolve() for x in reversed(self.chain)
        ]
        assert vhd.check(self.leaf) == []

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


ChainMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_chain_machine = ChainMachine.TestCase
