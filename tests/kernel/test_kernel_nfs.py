"""The nfs SR in the kernel tier: plugins/nfs/NFSSR in the guest mounts with
the guest kernel's NFS client (``mount -t nfs``, NFSv4.1, soft, retry=0)
from the host's nfs-ganesha (the fixture of tests/integration/nfs, in a
network namespace; the guest reaches its address through qemu's user
network). guest/scenario_nfs.py runs the SR and VDI life cycle, a filer
stopped and restarted mid-session (the host does it at checkpoints) and a
dead filer. The host checks the export's files with the VHD library while
the SR is detached, and that SR.destroy removed the SR's directory."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from patterns import BASE_WRITES, LEAF_WRITES, mismatches
from scenario import MARKS
from testenv import REPO

sys.path.insert(0, str(REPO / "tests" / "integration" / "nfs"))

from nfs_server import NfsServer, skip_without_nfs_server, sweep_stale

pytestmark = MARKS


@pytest.fixture
def nfs_server(tmp_path: Path) -> Iterator[NfsServer]:
    skip_without_nfs_server()
    sweep_stale()
    server = NfsServer(tmp_path / "nfs-server").start()
    try:
        yield server
    finally:
        server.close()


def test_nfs_sr_with_the_kernel_nfs_client(
    run_guest: Any, nfs_server: NfsServer, tmp_path: Path
) -> None:
    from smcommon import vhd

    sr = str(uuid.uuid4())
    sr_dir = nfs_server.export_dir / sr
    checked: dict[str, Any] = {}

    def at_checkpoint(name: str, data: dict[str, Any]) -> None:
        if name == "nfs: stop the filer":
            nfs_server.stop_nfs()
        elif name == "nfs: start the filer":
            nfs_server.start_nfs()
        elif name == "nfs: detached":
            host = {
                k: sr_dir / Path(v).relative_to(data["mountpoint"])
                for k, v in data["images"].items()
            }
            for k, p in host.items():
                assert vhd.check(str(p)) == [], f"{k} image {p}: vhd.check"
            leaf, snap = str(host["leaf"]), str(host["snapshot"])
            assert vhd.info(leaf).parent is not None
            want = BASE_WRITES + LEAF_WRITES
            assert mismatches(lambda o, n: vhd.read(leaf, o, n), want) == []
            assert mismatches(lambda o, n: vhd.read(snap, o, n), BASE_WRITES) == []
            # and over NFS, as another client sees the share
            listed = nfs_server.nfs_ls(f"/export/{sr}")
            assert {p.name for p in host.values()} <= set(listed), listed
            checked[name] = sorted(listed)
        else:
            raise AssertionError(f"unexpected checkpoint {name}")

    params = {
        "server": nfs_server.address,
        "serverpath": "/export",
        "nfsversion": "4.1",
        # A soft mount answers EIO when an RPC goes unanswered for about
        # timeo * (1 + 2 + 3) (default timeo=20: 12 s). The emulated guest
        # on a loaded machine can be starved of CPU that long while its
        # timers run on real time (seen once in four runs at load 10+: an
        # open() got EIO): the tier gives the mount 10 s per try, through
        # the device_config key a host would use.
        "options": "timeo=100",
        "sr": sr,
        "dead": nfs_server.dead_address,
    }
    run = run_guest("nfs", params, on_checkpoint=at_checkpoint)
    assert "nfs: detached" in checked, "the host never checked the detached SR"
    attach = run.result("nfs: SR.attach (mount -t nfs)")
    assert " nfs4 " in attach["mount"] and "vers=4.1" in attach["mount"], attach
    assert ",soft," in attach["mount"] and ",timeo=100," in attach["mount"], attach
    assert not sr_dir.exists(), f"SR.destroy left {sr_dir}"
    stopped = run.result("nfs: a call while the filer is stopped")["error"]
    assert stopped[0] == "Backend_error", stopped
    back = run.result("nfs: the filer is back: the same mount serves (no re-attach)")
    assert len(back["vdis"]) == 2, back
    dead = run.result("nfs: a dead filer: SR.attach")
    assert dead["error"][0] == "Backend_error", dead
    assert nfs_server.dead_address in " ".join(dead["error"]), dead
    kernel = run.result("nfs: a dead filer: the kernel mount (retry=0)")
    assert "retry=0" in " ".join(kernel["argv"]), kernel
    assert nfs_server.dead_address in " ".join(kernel["error"]), kernel
    # Not a performance figure: without retry=0 mount.nfs retries a dead
    # host for 2 minutes (captured: 124-125 s); with it, one attempt.
    assert kernel["seconds"] < 60, kernel
