"""An NFS server that goes away mid-session (stopped, or frozen so that it
stops answering) and comes back: calls fail with a clear error naming the
server while it is away (each call probes it with a short timeout first), and
work again when it returns, without SR.detach/SR.attach, with nothing lost.
Each test has a server of its own (nfs-ganesha in a network namespace); the
mounts are development mounts (this kernel has no NFS client)."""

from __future__ import annotations

import pytest
from ext_helpers import Ext, MiB, SrFactory

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

K4 = 4096


@pytest.fixture
def own_factory(own_nfs: Ext, tmp_path):  # type: ignore[no-untyped-def]
    f = SrFactory(own_nfs, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


def _calls(sr, vdi: str) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    return [
        ("SR.scan", {}),
        ("VDI.create", {"vdi_info": {"name_label": "while-down", "virtual_size": "1048576"}}),
        ("VDI.snapshot", {"vdi_info": {"vdi": vdi}}),
        ("VDI.attach", {"dp": "vm", "vdi": vdi, "read_write": True}),
        ("VDI.stat", {"vdi": vdi}),
        ("SR.gc", {}),
        ("SR.detach", {}),
    ]


@pytest.mark.parametrize("kind", ["nfs3", "nfs4.1"])
def test_server_stopped_mid_session_and_restarted(own_factory: SrFactory, kind: str) -> None:
    server = own_factory.ext.backend
    sr = own_factory.make(kind)
    v = sr.create("d", 4 * MiB)["vdi"]
    sr.write(v, {0: b"k" * K4})
    before = sr.scan()
    server.stop_nfs()
    for method, args in _calls(sr, v):
        err = sr.err(method, **args)
        assert err[0] == "Backend_error", err
        assert err[1] in ("NFS_SERVER_UNREACHABLE", "NFS_SERVICE_UNAVAILABLE"), (method, err)
        assert server.address in err[2] and "port" in err[2], err
    server.start_nfs()
    # back: the same attach serves again, nothing lost, nothing half-made
    assert sr.scan() == before
    assert sr.read(v, [(0, K4)]) == [b"k" * K4]
    w = sr.create("after", 2 * MiB)["vdi"]
    sr.snapshot(v)
    assert w in sr.ext.backend.nfs_ls(f"/export/{sr.uuid}/.sm/vdi").__str__()
    sr.assert_consistent()


def test_server_that_stops_answering(own_factory: SrFactory) -> None:
    """ganesha frozen (SIGSTOP): connections are accepted by the kernel but
    nothing answers; the probe's timeout bounds every call."""
    server = own_factory.ext.backend
    sr = own_factory.make("nfs4.1")
    v = sr.create("d", 2 * MiB)["vdi"]
    server.pause()
    try:
        err = sr.err("VDI.stat", vdi=v)
        assert err[:2] == ["Backend_error", "NFS_SERVER_UNREACHABLE"], err
        assert "no answer" in err[2] and server.address in err[2] and "2049" in err[2], err
    finally:
        server.resume()
    assert sr.ok("VDI.stat", vdi=v)["name_label"] == "d"
    sr.assert_consistent()
