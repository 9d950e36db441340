"""Fixtures of the lvmoiscsi black-box tests (helpers: lvmo_helpers.py, tgtd.py).

tgtd        one real target daemon for the session (tests/integration/conftest.py)
target      a new file-backed LUN with a CHAP account on it, removed afterwards
lvmo        the real LVMoISCSISR on a fresh SM_ROOT; afterwards no process with
            that SM_ROOT (plugin calls, qemu-storage-daemon) may be left running
lsr         an SR created and attached on ``target``; afterwards SR.detach must
            leave no loop device, mount or state of it behind
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent / "ext")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ext_helpers import leftover_processes
from lvmo_helpers import (
    Lvmo,
    LvmoSR,
    detach_and_check,
    force_cleanup,
    make_sr,
)
from tgtd import Target, Tgtd

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def target(tgtd: Tgtd, request: pytest.FixtureRequest) -> Iterator[Target]:
    t = tgtd.add_target("t")
    try:
        yield t
    finally:
        tgtd.remove_target(t)


@pytest.fixture
def lvmo(sm_root: Path, request: pytest.FixtureRequest) -> Iterator[Lvmo]:
    e = Lvmo(sm_root, dbg=f"itest:{request.node.name}")
    yield e
    for ls in (e.call("SR.ls").value or []):  # a test that failed with SRs attached
        if not e.call("SR.detach", sr=ls).ok:
            e.call("SR.reset", sr=ls)
    forced = force_cleanup(sm_root)
    assert not forced, f"left behind, cleaned by force: {forced}"
    left = leftover_processes(sm_root)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"processes left running: {[p.info for p in left]}"


@pytest.fixture
def lsr(lvmo: Lvmo, tgtd: Tgtd, target: Target) -> Iterator[LvmoSR]:
    sr = make_sr(lvmo, tgtd, target)
    yield sr
    if sr.uuid in (lvmo.call("SR.ls").value or []):
        detach_and_check(sr)
