"""Fixtures of the ext black-box tests (helpers: ext_helpers.py beside this file).

ext          an ``Ext`` (call/ok/err) on a fresh SM_ROOT; checks afterwards
             that no process with that SM_ROOT is left running (psutil)
sr           an attached SR, parametrised over ``path`` (a directory) and
             ``ext4`` (mkfs.ext4 on a loop device; root only, else skipped)
path_sr      an attached ``path`` SR only (the cheaper fixture)
make_sr      make more SRs of either kind in the same SM_ROOT
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# importlib import mode (setup.cfg): make ext_helpers beside this file importable
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from ext_helpers import (
    PLUGIN,
    SR,
    Ext,
    SrFactory,
    leftover_processes,
    sr_kinds,
    sweep_stale_loop_devices,
)


@pytest.fixture(scope="session", autouse=True)
def _stale_loop_devices() -> None:
    """Loop devices of an earlier session killed before its teardown."""
    swept = sweep_stale_loop_devices()
    if swept:
        print(f"detached stale loop devices of dead test sessions: {swept}")


@pytest.fixture
def ext(sm_root: Path, request: pytest.FixtureRequest) -> Iterator[Ext]:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} does not exist")
    e = Ext(sm_root, dbg=f"itest:{request.node.name}")
    yield e
    left = leftover_processes(sm_root)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"processes left running: {[p.info for p in left]}"


@pytest.fixture
def make_sr(ext: Ext, tmp_path: Path) -> Iterator[SrFactory]:
    f = SrFactory(ext, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture(params=sr_kinds())
def each_sr(make_sr: SrFactory, request: pytest.FixtureRequest) -> SR:
    """An attached SR of each kind: ``path``, and ``ext4`` (root only)."""
    return make_sr.make(request.param)


@pytest.fixture
def sr(make_sr: SrFactory) -> SR:
    """An attached ``path`` SR (what most tests need: a process per call is
    the cost, and the ext4 kind differs only in SR.create/attach/detach)."""
    return make_sr.make("path")


@pytest.fixture
def path_sr(sr: SR) -> SR:
    return sr
