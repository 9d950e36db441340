"""smcommon.nfs against captured real outputs of rpcinfo, showmount and
mount.nfs (tests/data/captures, taken on a full kernel against nfs-ganesha:
this machine's kernel has no NFS client).  The argv of every command, the
exact mount options for each nfsversion and option set, and the error each
failure becomes (naming server, port and path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captures import FakeRunner, load
from smcommon import mount, nfs
from smcommon.errors import to_wire

HOST = "10.251.77.2"
PATH = "/exports/sr1"


def wire(exc: BaseException) -> list[str]:
    return to_wire(exc)


# --- probe ---------------------------------------------------------------------


def test_probe_v3_through_rpcbind_is_the_captured_argv() -> None:
    nfs3, mountd3 = load("rpcinfo", "T_tcp_nfs_3"), load("rpcinfo", "T_tcp_mountd_3")
    run = FakeRunner(nfs3, mountd3)
    p = nfs.probe(nfs.Server(HOST, "3"), run)
    assert run.calls == [nfs3.argv, mountd3.argv]
    assert all(t == nfs.PROBE_TIMEOUT for t in run.timeouts)
    assert p.address == HOST and len(p.answered) == 2


@pytest.mark.parametrize("version", ["4", "4.0", "4.1", "4.2"])
def test_probe_v4_goes_straight_to_the_nfs_port(version: str) -> None:
    # the capture's own call went through rpcbind; the answer is the same
    run = FakeRunner(load("rpcinfo", "T_tcp_nfs_4"))
    nfs.probe(nfs.Server(HOST, version), run)
    assert run.calls == [["rpcinfo", "-a", f"{HOST}.8.1", "-T", "tcp", "nfs", "4"]]
    run = FakeRunner(load("rpcinfo", "T_tcp_nfs_4"))
    nfs.probe(nfs.Server(HOST, version, port=20490), run)
    assert run.calls == [["rpcinfo", "-a", f"{HOST}.80.10", "-T", "tcp", "nfs", "4"]]


def test_probe_v3_with_a_port_calls_it_then_mountd_through_rpcbind() -> None:
    run = FakeRunner(load("rpcinfo", "T_tcp_nfs_3"), load("rpcinfo", "T_tcp_mountd_3"))
    nfs.probe(nfs.Server(HOST, "3", port=2049), run)
    assert run.calls[0] == ["rpcinfo", "-a", f"{HOST}.8.1", "-T", "tcp", "nfs", "3"]
    assert run.calls[1] == load("rpcinfo", "T_tcp_mountd_3").argv


def test_probe_failures_name_server_and_port() -> None:
    server = nfs.Server(HOST, "3")
    cases = [
        ("T_tcp_nfs_3_server_dead", nfs.ServerUnreachable, "connection refused"),
        ("T_tcp_nfs_3_ganesha_down", nfs.NfsServiceMissing, "not registered"),
        ("T_tcp_nfs_2_unsupported", nfs.NfsServiceMissing, "versions 3 to 4"),
        ("p_server_unresponsive", nfs.ServerUnreachable, "no route to host"),
        ("p_server_blackholed", nfs.ServerUnreachable, "within 4s"),
    ]
    for case, cls, words in cases:
        with pytest.raises(cls) as info:
            nfs.probe(server, FakeRunner(load("rpcinfo", case)))
        text = " ".join(wire(info.value))
        assert words in text, (case, text)
        assert HOST in text and "port 111" in text, text


def test_probe_of_a_name_resolves_it_with_a_bound() -> None:
    getent = load("rpcinfo", "T_tcp_nfs_4")  # any successful capture as the shape
    calls: list[list[str]] = []

    def run(argv, *, timeout, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(argv))
        if argv[0] == "getent":
            assert timeout <= nfs.RESOLVE_TIMEOUT
            from smcommon.runner import Result

            return Result(0, f"{HOST}      STREAM filer\n{HOST}      DGRAM\n", "")
        return FakeRunner(getent)(argv, timeout=timeout)

    nfs.probe(nfs.Server("filer", "4.1"), run)
    assert calls == [["getent", "ahosts", "filer"], ["rpcinfo", "-a", f"{HOST}.8.1", "-T", "tcp", "nfs", "4"]]


# --- exports -------------------------------------------------------------------


def test_showmount() -> None:
    for case in ("e_server", "e_server_no_headers"):
        cap = load("showmount", case)
        assert nfs.parse_showmount(cap.stdout) == [nfs.Export(PATH, ("10.251.77.0/24",))]
    cap = load("showmount", "e_server_no_headers")
    run = FakeRunner(cap)
    exps = nfs.exports(nfs.Server(HOST), run)
    assert run.calls == [cap.argv]
    assert nfs.covering(exps, PATH) == exps[0]
    assert nfs.covering(exps, PATH + "/sr-uuid") == exps[0]
    assert nfs.covering(exps, "/exports/sr10") is None
    assert nfs.covering(exps, "/exports") is None
    assert nfs.parse_showmount("/a (everyone)\n/b h1,h2 h3\n") == [
        nfs.Export("/a", ("(everyone)",)), nfs.Export("/b", ("h1", "h2", "h3"))
    ]  # fmt: skip


def test_showmount_failures() -> None:
    for case, cls in [
        ("e_server_ganesha_down", nfs.NfsServiceMissing),
        ("e_server_dead", nfs.ServerUnreachable),
        ("e_server_blackholed", nfs.ServerUnreachable),
    ]:
        with pytest.raises(cls) as info:
            nfs.exports(nfs.Server(HOST), FakeRunner(load("showmount", case)))
        assert HOST in str(info.value)


# --- mount options and argv ------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "port", "extra", "want"),
    [
        ("3", None, [], "vers=3,soft,timeo=20,retrans=2,proto=tcp,retry=0"),
        ("4", None, [], "vers=4,soft,timeo=20,retrans=2,proto=tcp,retry=0"),
        ("4.0", None, [], "vers=4.0,soft,timeo=20,retrans=2,proto=tcp,retry=0"),
        ("4.1", 2050, [], "vers=4.1,soft,timeo=20,retrans=2,proto=tcp,retry=0,port=2050"),
        ("4.2", None, ["noatime", "rsize=65536"],
         "vers=4.2,soft,timeo=20,retrans=2,proto=tcp,retry=0,noatime,rsize=65536"),
        ("3", 2049, ["timeo=50", "nconnect=4", "retrans=3", "proto=tcp6"],
         "vers=3,soft,timeo=50,retrans=3,proto=tcp6,retry=0,port=2049,nconnect=4"),
    ],
)  # fmt: skip
def test_mount_argv_for_each_version_and_option_set(
    version: str, port: int | None, extra: list[str], want: str
) -> None:
    server = nfs.Server(HOST, version, port)
    opts = nfs.mount_options(version, port, extra)
    argv = mount.mount_argv(server.source(PATH + "/sr"), "/run/sm/sr-mount/sr", "nfs", opts)
    assert argv == ["mount", "-t", "nfs", "-o", want, f"{HOST}:{PATH}/sr", "/run/sm/sr-mount/sr"]


def test_mount_argv_with_the_captures_bounds_is_byte_for_byte_the_captured_one() -> None:
    """With timeo=10,retrans=1 our argv is exactly what was run on the real
    kernel for the retry=0 captures (which failed in 1-4 s, not 125 s)."""
    for case, version in [("v3_server_dead_retry0", "3"), ("v41_ganesha_down_retry0", "4.1")]:
        cap = load("mount_nfs", case)
        opts = nfs.mount_options(version, None, nfs.parse_options("timeo=10,retrans=1"))
        server = nfs.Server(HOST, version)
        assert mount.mount_argv(server.source(PATH), "/mnt/x", "nfs", opts) == cap.argv
        assert cap.seconds < 10


def test_ipv6_server_is_bracketed() -> None:
    s = nfs.Server("fd00::2", "4.1")
    assert s.source("/e") == "[fd00::2]:/e"
    assert s.url("/e") == "nfs://[fd00::2]/e?version=4"
    assert nfs.probe_argv("fd00::2", "nfs", "4.1", 2049) == [
        "rpcinfo", "-a", "fd00::2.8.1", "-T", "tcp6", "nfs", "4"
    ]  # fmt: skip


def test_parse_options_allow_list() -> None:
    assert nfs.parse_options("") == []
    assert nfs.parse_options(" noatime , rsize=65536,sec=krb5i") == [
        "noatime", "rsize=65536", "sec=krb5i"
    ]  # fmt: skip
    for bad, words in [
        ("hard", "hang forever"),
        ("noatime,nolock", "locks would stay on this host"),
        ("local_lock=all", "locks would stay"),
        ("retry=2", "retry is 0"),
        ("vers=3", "nfsversion"),
        ("bogusoption", "not an allowed mount option"),
        ("rsize=abc", "whole number"),
        ("timeo=1", "from 5 to 600"),
        ("retrans=99", "from 1 to 5"),
        ("sec=none", "one of sys"),
        ("noatime,noatime", "twice"),
        ("rsize", "not an allowed"),
        ("x-mount.mkdir", "not an allowed"),
    ]:
        with pytest.raises(nfs.BadOption) as info:
            nfs.parse_options(bad)
        w = wire(info.value)
        assert w[:2] == ["Backend_error", "DEVICE_CONFIG_INVALID"], w
        assert w[2].startswith("options: ") and words in w[2], (bad, w)


# --- mount.nfs failures ----------------------------------------------------------


def test_mount_failures_become_clear_errors() -> None:
    cases = [
        ("v3_wrong_export", "3", nfs.MountRefused, "access denied"),
        ("v41_wrong_export", "4.1", nfs.ExportMissing, "no such directory"),
        ("v3_server_dead_retry0", "3", nfs.ServerUnreachable, "connection refused"),
        ("v41_ganesha_down_retry0", "4.1", nfs.ServerUnreachable, "connection refused"),
        ("v3_server_unresponsive_retry0", "3", nfs.ServerUnreachable, "no route to host"),
        ("v41_server_blackholed_retry0", "4.1", nfs.ServerUnreachable, "timed out"),
        ("v3_ganesha_down", "3", nfs.NfsServiceMissing, "not served"),
        ("v3_unsupported_vers2", "3", nfs.NfsServiceMissing, "not served"),
    ]
    for case, version, cls, words in cases:
        cap = load("mount_nfs", case)
        server = nfs.Server(HOST, version)
        err = nfs.mount_failure(server, PATH, cap.stderr)
        assert isinstance(err, cls), (case, err)
        text = " ".join(wire(err))
        assert words in text and HOST in text and PATH in text, (case, text)
    err = nfs.mount_failure(nfs.Server(HOST), PATH, load("mount_nfs", "v3_bad_option").stderr)
    assert wire(err)[:2] == ["Backend_error", "MOUNT_FAILED"]


def test_libnfs_failures() -> None:
    """nfs-ls's words, as seen against nfs-ganesha on this machine."""
    s = nfs.Server(HOST, "3")
    refused = "Failed to mount nfs share : mount_cb: RPC error: Mount failed with error MNT3ERR_ACCES(13) Permission denied(13)"
    missing4 = "Failed to mount nfs share : mount_cb: NFS4: (path /export/nope) failed with NFS4ERR_NOENT(-2)"
    dead = "Failed to mount nfs share : nfs_service failed"
    assert isinstance(nfs.libnfs_failure(s, PATH, refused), nfs.MountRefused)
    assert isinstance(nfs.libnfs_failure(s, PATH, missing4), nfs.ExportMissing)
    assert isinstance(nfs.libnfs_failure(s, PATH, dead), nfs.ServerUnreachable)
