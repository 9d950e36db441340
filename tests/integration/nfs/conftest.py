"""Fixtures of the NFS-specific tests (the suites shared with ext run over nfs
from tests/integration/ext, parametrised by SR type).

nfs           an ``Ext`` caller of plugins/nfs/NFSSR on a fresh SM_ROOT, with
              the session's NFS server (``nfs.backend``) and the development
              mount's environment; checks that no process is left running
host_b        a second host: another SM_ROOT calling NFSSR against the same server
own_server    an NFS server of the test's own (stopped, frozen, restarted)
own_nfs       an ``Ext`` caller against ``own_server``
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

HERE = Path(__file__).resolve().parent
for d in (HERE, HERE.parent / "ext"):
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))

from ext_helpers import Ext, SrFactory, leftover_processes
from nfs_server import NfsServer, dev_env, skip_without_nfs_server
from sr_types import SR_TYPES

NFSSR = SR_TYPES["nfs"].plugin


def _caller(root: Path, server: NfsServer, env: dict[str, str], dbg: str) -> Ext:
    root.mkdir(parents=True, exist_ok=True)
    return Ext(root, dbg=dbg, plugin=NFSSR, env=env, sr_type="nfs", backend=server)


def _check_left(root: Path) -> None:
    left = leftover_processes(root)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"processes left running: {[p.info for p in left]}"


@pytest.fixture
def nfs(
    sm_root: Path, nfs_server: NfsServer, nfs_env: dict[str, str], request: Any
) -> Iterator[Ext]:
    e = _caller(sm_root, nfs_server, nfs_env, f"itest:{request.node.name}")
    yield e
    _check_left(sm_root)


@pytest.fixture
def host_b(
    tmp_path: Path, nfs_server: NfsServer, nfs_env: dict[str, str], request: Any
) -> Iterator[Ext]:
    root = tmp_path / "host-b"
    e = _caller(root, nfs_server, nfs_env, f"itest-b:{request.node.name}")
    yield e
    _check_left(root)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NfsServer]:
    skip_without_nfs_server()
    server = NfsServer(tmp_path / "own-server").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_nfs(sm_root: Path, own_server: NfsServer, tmp_path: Path, request: Any) -> Iterator[Ext]:
    env = dev_env(own_server, tmp_path)
    e = _caller(sm_root, own_server, env, f"itest:{request.node.name}")
    yield e
    _check_left(sm_root)


@pytest.fixture
def factory(nfs: Ext, tmp_path: Path) -> Iterator[SrFactory]:
    f = SrFactory(nfs, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()
