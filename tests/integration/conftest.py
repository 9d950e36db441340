"""Fixtures shared by the integration tests of every directory.

nfs_server   one real NFS server for the session: nfs-ganesha in a network
             namespace (tests/integration/nfs/nfs_server.py), exporting a tmp
             directory; root only (else the tests that need it are skipped)
nfs_env      the environment of an NFS plugin call on this machine: the
             development mount (the kernel has no NFS client) and its map of
             the server's exports (SM_NFS_DEV_MODE, SM_NFS_DEV_EXPORTS)
tgtd         one real iSCSI target for the session: Debian's tgtd on
             127.0.0.1 (its own port and control socket;
             tests/integration/lvmoiscsi/tgtd.py); root only (else skipped)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

NFS_DIR = str(Path(__file__).resolve().parent / "nfs")
LVMO_DIR = str(Path(__file__).resolve().parent / "lvmoiscsi")
for _d in (NFS_DIR, LVMO_DIR):
    if _d not in sys.path:
        sys.path.insert(0, _d)

from nfs_server import NfsServer, dev_env, skip_without_nfs_server, sweep_stale
from tgtd import Tgtd, available


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    skip_without_nfs_server()
    sweep_stale()
    server = NfsServer(tmp_path_factory.mktemp("nfs-server")).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tgtd]:
    why = available()
    if why:
        pytest.skip(why)
    t = Tgtd(tmp_path_factory.mktemp("tgtd"))
    t.start()
    try:
        yield t
    finally:
        t.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which NFS mount the NFS tests went through, and how the iSCSI LUNs
    were carried."""
    if Tgtd.started:
        plugins_lvmo = str(Path(__file__).resolve().parents[2] / "lib")
        if plugins_lvmo not in sys.path:
            sys.path.insert(0, plugins_lvmo)
        from smcommon.lun import kernel_has_iscsi

        how = ("the kernel initiator (open-iscsi)" if kernel_has_iscsi() else
               "the userspace initiator (qemu-storage-daemon's iSCSI export over FUSE and a "
               "loop device: no iSCSI initiator in this kernel), LVs as loop devices over "
               "their extents (no device-mapper), real lvm2 metadata")
        terminalreporter.write_line(
            f"iSCSI: tests ran against tgtd at {', '.join(dict.fromkeys(Tgtd.started))} "
            f"through {how}")
    if not NfsServer.started:
        return
    plugins_nfs = str(Path(__file__).resolve().parents[2] / "plugins" / "nfs")
    if plugins_nfs not in sys.path:
        sys.path.insert(0, plugins_nfs)
    from nfs_mounters import kernel_has_nfs

    how = (
        "the kernel NFS client (mount -t nfs)"
        if kernel_has_nfs()
        else "the development mount (no NFS client in this kernel: rpcinfo, showmount "
        "and nfs-ls talk NFS to the server, then its exported directory is bind-mounted)"
    )
    terminalreporter.write_line(
        f"NFS: tests ran against nfs-ganesha at {', '.join(dict.fromkeys(NfsServer.started))} "
        "(network namespaces) "
        f"through {how}"
    )


@pytest.fixture(scope="session")
def nfs_env(nfs_server: NfsServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return dev_env(nfs_server, tmp_path_factory.mktemp("nfs-env"))
