"""NFSSR's SR type on a kernel *with* an NFS client, replayed: this machine's
kernel has none, so the commands of SR.create/attach/detach run through a
fake runner answering with captured real outputs (tests/data/captures: a
Debian 12 kernel mounting from nfs-ganesha).  Checks the exact commands, in
order, and the errors the captured failures become.  (The development mount
is exercised against a real server in tests/integration/nfs.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2] / "plugins" / "nfs"))

import nfs_driver
import nfs_mounters
from captures import FakeRunner, load
from smcommon import nfs
from smcommon.errors import BackendError, to_wire
from smcommon.paths import Paths

SR = "5d1e6d1c-1d4b-4c53-8f9b-6b3a2f0c9e11"
HOST = "10.251.77.2"
OPTS = "vers=3,soft,timeo=20,retrans=2,proto=tcp,retry=0"


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A kernel that lists nfs in /proc/filesystems."""
    fs = tmp_path / "filesystems"
    fs.write_text("nodev\tsysfs\n\text4\nnodev\tnfs\nnodev\tnfs4\n")
    monkeypatch.setattr(nfs_mounters, "FILESYSTEMS", str(fs))
    return fs


def sr_type(tmp_path: Path, run: FakeRunner) -> nfs_driver.NfsType:
    return nfs_driver.NfsType(Paths(tmp_path / "root"), runner=run)


def probe_ok() -> list:  # type: ignore[type-arg]
    return [load("rpcinfo", "T_tcp_nfs_3"), load("rpcinfo", "T_tcp_mountd_3")]


def test_kernel_has_nfs(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert nfs_mounters.kernel_has_nfs()
    assert isinstance(nfs_mounters.choose(lambda *a, **k: None), nfs_mounters.KernelMounter)
    none = tmp_path / "none"
    none.write_text("nodev\tsysfs\n\text4\n")
    monkeypatch.setattr(nfs_mounters, "FILESYSTEMS", str(none))
    monkeypatch.setattr(nfs_mounters, "MODULES", str(tmp_path / "no-modules"))
    monkeypatch.delenv(nfs_mounters.ENV_DEV_MODE, raising=False)
    assert not nfs_mounters.kernel_has_nfs()
    with pytest.raises(BackendError) as info:
        nfs_mounters.choose(lambda *a, **k: None)
    assert info.value.code == "NFS_CLIENT_MISSING"


def test_attach_mounts_the_sr_directory(kernel: Path, tmp_path: Path) -> None:
    run = FakeRunner(*probe_ok(), load("mount_nfs", "v3_success"))
    t = sr_type(tmp_path, run)
    cfg = {"server": HOST, "serverpath": "/exports/sr1"}
    mnt, mounted = t.open(SR, cfg, create=False)
    assert mounted and mnt == Paths(tmp_path / "root").sr_mount(SR)
    assert run.calls == [
        ["rpcinfo", "-T", "tcp", HOST, "nfs", "3"],
        ["rpcinfo", "-T", "tcp", HOST, "mountd", "3"],
        ["mount", "-t", "nfs", "-o", OPTS, f"{HOST}:/exports/sr1/{SR}", str(mnt)],
    ]
    state = t.state(SR)
    assert state is not None and state["mode"] == "kernel"
    assert state["argv"] == run.calls[-1]


@pytest.mark.parametrize(
    ("version", "opts"),
    [
        ("4.1", "vers=4.1,soft,timeo=20,retrans=2,proto=tcp,retry=0,port=2049,noatime"),
        ("4.2", "vers=4.2,soft,timeo=20,retrans=2,proto=tcp,retry=0,port=2049,noatime"),
    ],
)
def test_attach_v4_with_a_port_and_options(
    kernel: Path, tmp_path: Path, version: str, opts: str
) -> None:
    run = FakeRunner(load("rpcinfo", "T_tcp_nfs_4"), load("mount_nfs", "v41_success"))
    t = sr_type(tmp_path, run)
    cfg = {"server": HOST, "serverpath": "/exports/sr1/", "nfsversion": version,
           "port": "2049", "options": "noatime"}  # fmt: skip
    mnt, _ = t.open(SR, cfg, create=False)
    assert run.calls == [
        ["rpcinfo", "-a", f"{HOST}.8.1", "-T", "tcp", "nfs", "4"],
        ["mount", "-t", "nfs", "-o", opts, f"{HOST}:/exports/sr1/{SR}", str(mnt)],
    ]


def test_create_makes_the_sr_directory_through_a_parent_mount(kernel: Path, tmp_path: Path) -> None:
    run = FakeRunner(
        *probe_ok(),
        load("mount_nfs", "v3_success"),  # <serverpath> at a temporary place
        load("mount_nfs", "v3_umount"),
        load("mount_nfs", "v3_success"),  # <serverpath>/<sr> at the SR's mount point
    )
    t = sr_type(tmp_path, run)
    mnt, _ = t.open(SR, {"server": HOST, "serverpath": "/exports/sr1"}, create=True)
    parent = tmp_path / "root" / "run" / "sm" / "nfs" / "parent" / SR
    assert run.calls[2] == ["mount", "-t", "nfs", "-o", OPTS, f"{HOST}:/exports/sr1", str(parent)]
    assert run.calls[3] == ["umount", str(parent)]
    assert run.calls[4][-2:] == [f"{HOST}:/exports/sr1/{SR}", str(mnt)]
    # nothing is really mounted in this replay: <sr> was made where the
    # kernel would have shown <serverpath>
    assert (parent / SR).is_dir()


def test_attach_of_a_missing_sr_directory(kernel: Path, tmp_path: Path) -> None:
    """mount.nfs says access denied (NFSv3 servers say so for a missing
    path); the export is listed, its parent mounts, and the SR directory is
    not in it: SR_DIR_MISSING naming the path."""
    run = FakeRunner(
        *probe_ok(),
        load("mount_nfs", "v3_wrong_export"),
        load("showmount", "e_server_no_headers"),
        load("mount_nfs", "v3_success"),
        load("mount_nfs", "v3_umount"),
    )
    t = sr_type(tmp_path, run)
    with pytest.raises(BackendError) as info:
        t.open(SR, {"server": HOST, "serverpath": "/exports/sr1"}, create=False)
    assert info.value.code == "SR_DIR_MISSING"
    assert f"/exports/sr1/{SR}" in str(info.value) and HOST in str(info.value)
    assert run.calls[3] == load("showmount", "e_server_no_headers").argv
    assert not run.replies


@pytest.mark.parametrize(
    ("replies", "code", "words"),
    [
        (["T_tcp_nfs_3_server_dead"], "NFS_SERVER_UNREACHABLE", "port 111: connection refused"),
        (["T_tcp_nfs_3_ganesha_down"], "NFS_SERVICE_UNAVAILABLE", "not registered"),
        (["p_server_blackholed"], "NFS_SERVER_UNREACHABLE", "within 4s"),
    ],
)
def test_dead_servers_fail_before_any_mount(
    kernel: Path, tmp_path: Path, replies: list[str], code: str, words: str
) -> None:
    run = FakeRunner(*[load("rpcinfo", r) for r in replies])
    t = sr_type(tmp_path, run)
    with pytest.raises(BackendError) as info:
        t.open(SR, {"server": HOST, "serverpath": "/exports/sr1"}, create=False)
    wire = to_wire(info.value)
    assert wire[1] == code and words in wire[2] and HOST in wire[2], wire
    assert all(c[0] == "rpcinfo" for c in run.calls)  # never reached mount


def test_mount_failures_after_a_good_probe(kernel: Path, tmp_path: Path) -> None:
    """The server went down between the probe and the mount (captured with
    retry=0: 1.2 s, not 125 s)."""
    run = FakeRunner(*probe_ok(), load("mount_nfs", "v3_server_dead_retry0"))
    t = sr_type(tmp_path, run)
    with pytest.raises(nfs.ServerUnreachable):
        t.open(SR, {"server": HOST, "serverpath": "/exports/sr1"}, create=False)
    assert not (tmp_path / "root" / "run" / "sm" / "sr-mount" / SR).exists()


def test_detach_unmounts_and_never_lazily(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = FakeRunner(load("mount_nfs", "v3_umount"))
    t = sr_type(tmp_path, run)
    mnt = tmp_path / "root" / "run" / "sm" / "sr-mount" / SR
    mnt.mkdir(parents=True)
    from smcommon import mount

    entry = mount.parse_mounts(load("mount_nfs", "v3_proc_mounts_line").stdout)[0]
    monkeypatch.setattr(mount, "mounted_at", lambda target, table=None: entry)
    t.close(SR, mnt, True)
    assert run.calls == [["umount", str(mnt)]]
    assert not mnt.exists()


def test_per_call_probe_uses_the_recorded_server(kernel: Path, tmp_path: Path) -> None:
    run = FakeRunner(*probe_ok(), load("mount_nfs", "v3_success"), load("rpcinfo", "T_tcp_nfs_3"))
    t = sr_type(tmp_path, run)
    t.open(SR, {"server": HOST, "serverpath": "/exports/sr1"}, create=False)
    t.check_online(SR)  # only the NFS program: no mountd needed after the mount
    assert run.calls[-1] == ["rpcinfo", "-T", "tcp", HOST, "nfs", "3"]
    t.check_online("not-attached-here")  # nothing recorded: nothing to probe
    assert len(run.calls) == 4
