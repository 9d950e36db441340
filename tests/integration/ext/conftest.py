"""Fixtures of the plugin black-box tests (helpers: ext_helpers.py, the SR
types: sr_types.py, beside this file).

sr_type      the SR type a test runs for: every test using ``ext`` runs once
             per type of sr_types.SR_TYPES (``@pytest.mark.sr_types(...)``
             narrows it)
ext          an ``Ext`` (call/ok/err) running that type's plugin on a fresh
             SM_ROOT; checks afterwards that no process with that SM_ROOT is
             left running (psutil)
sr           an attached SR of the type's default kind (ext: a ``path``
             directory; nfs: NFSv3 on the session's nfs-ganesha)
each_sr      an attached SR of every kind of every type (``sr_kind``: ext
             path and ext4 on a loop device, nfs3 and nfs4.1)
path_sr      the same as ``sr`` (the cheaper fixture, by its old name)
make_sr      make more SRs of the type in the same SM_ROOT
nfs_backend  the nfs type's backend: the session NFS server and the
             environment of the development mount
iscsi_backend  the lvmoiscsi type's backend: the session's tgtd (each SR gets a
             LUN of its own on it)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# importlib import mode (setup.cfg): make ext_helpers beside this file importable
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from ext_helpers import (
    SR,
    Ext,
    SrFactory,
    leftover_processes,
    sweep_stale_loop_devices,
)
from sr_types import SR_TYPES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("sr_types")
    wanted = list(marker.args) if marker else list(SR_TYPES)
    unknown = [t for t in wanted if t not in SR_TYPES]
    if unknown:
        raise pytest.UsageError(f"sr_types: unknown SR types {unknown}")
    if "sr_kind" in metafunc.fixturenames:
        metafunc.parametrize(
            ("sr_type", "sr_kind"),
            [
                pytest.param(t, k, id=f"{t}-{k}", marks=SR_TYPES[t].marks(k))
                for t in wanted
                for k in SR_TYPES[t].kinds
            ],
        )
    elif "sr_type" in metafunc.fixturenames:
        metafunc.parametrize(
            "sr_type", [pytest.param(t, id=t, marks=SR_TYPES[t].marks()) for t in wanted]
        )


@pytest.fixture(scope="session", autouse=True)
def _stale_loop_devices() -> None:
    """Loop devices of an earlier session killed before its teardown."""
    swept = sweep_stale_loop_devices()
    if swept:
        print(f"detached stale loop devices of dead test sessions: {swept}")


@pytest.fixture
def nfs_backend(nfs_server: Any, nfs_env: dict[str, str]) -> tuple[Any, dict[str, str]]:
    return nfs_server, nfs_env


@pytest.fixture
def iscsi_backend(tgtd: Any) -> tuple[Any, dict[str, str]]:
    # a tree change of an lvmoiscsi SR runs several lvm commands (40-90 ms each
    # on an idle machine, several times that under the test load): the eight
    # workers of the concurrency test queue longer on the SR's tree lock than
    # the default bound of 30 s
    return tgtd, {"SM_LOCK_TIMEOUT": "120"}


@pytest.fixture
def ext(sm_root: Path, request: pytest.FixtureRequest, sr_type: str) -> Iterator[Ext]:
    spec = SR_TYPES[sr_type]
    if not spec.plugin.exists():
        pytest.fail(f"{spec.plugin} does not exist")
    server, env = None, {}
    if spec.backend:
        server, env = request.getfixturevalue(spec.backend)
    e = Ext(
        sm_root, dbg=f"itest:{request.node.name}", plugin=spec.plugin, env=env,
        sr_type=sr_type, backend=server,
    )  # fmt: skip
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


@pytest.fixture
def each_sr(make_sr: SrFactory, sr_kind: str) -> SR:
    """An attached SR of each kind of each type."""
    return make_sr.make(sr_kind)


@pytest.fixture
def sr(make_sr: SrFactory) -> SR:
    """An attached SR of the type's default kind (what most tests need: a
    process per call is the cost; the other kinds differ only in SR.create/
    attach/detach)."""
    return make_sr.make()


@pytest.fixture
def path_sr(sr: SR) -> SR:
    return sr
