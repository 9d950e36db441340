"""TCP is mutual TLS: the dispatcher lets in only clients whose certificate its
CA signed, still valid, naming an allowed client; everyone else is refused
before any SMAPI call runs (no plugin process starts).  Certificates come
from scripts/make-certs (openssl).  Also: the daemon refuses to start on TCP
without TLS, ``--insecure`` binds only to loopback, the Unix socket is 0600
(or 0660 for a group)."""

from __future__ import annotations

import http.client
import os
import socket
import stat
import subprocess
import sys
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path

import pytest
from dispatcher_testlib import (
    REPO,
    Daemon,
    fake_pids,
    make_certs,
    spawn_daemon,
    tls_client,
)

from dispatcher import client, wire

pytestmark = pytest.mark.integration

REFUSED = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError, client.ConnectError)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_certs(tmp_path_factory.mktemp("certs"), "host", "admin", "stranger")
    return make_certs(d, "old", expired=True)


@pytest.fixture
def tls_daemon(start_in_mode: Callable[..., Daemon], certs: Path) -> Daemon:
    """A dispatcher on TLS letting in "admin" and "old" (expired: refused all the same)."""
    tcp = (
        "--tcp", "127.0.0.1:0",
        "--tls-cert", str(certs / "host.pem"), "--tls-key", str(certs / "host.key"),
        "--tls-ca", str(certs / "ca.pem"), "--allow-client", "admin", "--allow-client", "old",
    )  # fmt: skip
    d = start_in_mode(tcp=tcp)
    assert d.url and d.url.startswith("https://127.0.0.1:"), d.banner
    assert "mutual TLS; clients: admin, old" in d.banner
    return d


def _stat(d: Daemon, ctx: object, name: str = "host") -> dict[str, object]:
    sm = client.connect(d.url, path="/fake", context=ctx, server_name=name, timeout=30)  # type: ignore[arg-type]
    return sm.VDI.stat({"dbg": "tls", "sr": "s", "vdi": "ok"})  # type: ignore[no-any-return]


def test_an_allowed_client_is_served(tls_daemon: Daemon, certs: Path) -> None:
    r = _stat(tls_daemon, tls_client(certs, "admin"))
    assert r["Status"] == "Success", r
    assert len(fake_pids(Path(os.environ["FAKE_LOG_DIR"]))) == 1


def test_clients_without_a_good_certificate_are_refused_before_any_call(
    tls_daemon: Daemon, certs: Path, tmp_path: Path
) -> None:
    import ssl

    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(certs / "ca.pem")
    other = make_certs(tmp_path / "other-ca", "admin")  # the allowed name, another CA
    # the client trusts our CA (so that only the server's check fails)
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_cert_chain(other / "admin.pem", other / "admin.key")
    foreign.load_verify_locations(certs / "ca.pem")
    cases = {
        "no certificate": no_cert,
        "another CA": foreign,
        "expired": tls_client(certs, "old"),
        "a name not allowed": tls_client(certs, "stranger"),
    }
    for what, ctx in cases.items():
        with pytest.raises(REFUSED):
            r = _stat(tls_daemon, ctx)
            pytest.fail(f"{what}: served: {r}")
    # plain HTTP to the TLS port: no HTTP answer, the connection is closed
    host, port = str(tls_daemon.url).split("//")[1].rstrip("/").split(":")
    body = wire.dumps_call("VDI.stat", {"dbg": "plain", "sr": "s", "vdi": "ok"})
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /fake HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        try:
            got = s.recv(4096)
        except ConnectionResetError:
            got = b""
    assert not got.startswith(b"HTTP/"), got
    assert fake_pids(Path(os.environ["FAKE_LOG_DIR"])) == []  # no plugin ever ran
    rc, err = tls_daemon.stop()
    assert rc == 0
    assert err.count("refused a TLS client") >= 5, err
    assert "names ['stranger'], none of the allowed clients" in err
    assert "certificate has expired" in err
    assert "dbg=tls" not in err and "dbg=plain" not in err


def test_smctl_presents_a_certificate(tls_daemon: Daemon, certs: Path) -> None:
    def smctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher.smctl", "--url", str(tls_daemon.url), *args],
            capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
            env=dict(os.environ, **(env or {})),
        )  # fmt: skip

    files = [
        "--tls-cert", str(certs / "admin.pem"), "--tls-key", str(certs / "admin.key"),
        "--tls-ca", str(certs / "ca.pem"),
    ]  # fmt: skip
    r = smctl(*files, "--tls-server-name", "host", "--json", "vdi-stat", "s", "ok", "--type", "fake")
    assert r.returncode == 0, r.stderr
    env = {
        "SM_TLS_CERT": str(certs / "admin.pem"), "SM_TLS_KEY": str(certs / "admin.key"),
        "SM_TLS_CA": str(certs / "ca.pem"), "SM_TLS_SERVER_NAME": "host",
    }  # fmt: skip
    r = smctl("vdi-stat", "s", "ok", "--type", "fake", env=env)
    assert r.returncode == 0, r.stderr
    # the dispatcher's certificate must carry the name the client expects
    r = smctl(*files, "vdi-stat", "s", "ok", "--type", "fake")  # 127.0.0.1: not in it
    assert r.returncode == 3 and "certificate" in r.stderr.lower(), r.stderr
    # a client with no certificate at all gets a clear error
    r = smctl("vdi-stat", "s", "ok", env={"SM_TLS_CERT": "", "SM_ROOT": "/nonexistent"})
    assert r.returncode == 3 and "cannot speak TLS" in r.stderr, r.stderr


def test_tcp_without_tls_does_not_start(sm_root: Path, plugins_dir: Path) -> None:
    for argv, words in (
        (["--tcp", "127.0.0.1:0"], "serves mutual TLS only"),
        (["--tcp", "0.0.0.0:0", "--insecure"], "binds only to a loopback address, not 0.0.0.0"),
    ):
        d = spawn_daemon(["--plugins-dir", str(plugins_dir), "--no-socket", *argv], sm_root)
        rc, err = d.stop(timeout=30)
        assert rc != 0 and "sm-dispatcher ready" not in d.banner, (argv, d.banner)
        assert words in err, (argv, err)


def test_insecure_says_so(start_in_mode: Callable[..., Daemon]) -> None:
    d = start_in_mode()  # the fixture's default: --tcp 127.0.0.1:0 --insecure
    assert "INSECURE: plain HTTP, no client authentication" in d.banner
    rc, err = d.stop()
    assert rc == 0 and "INSECURE: TCP 127.0.0.1:0 is plain HTTP" in err


def test_unix_socket_is_root_only_or_a_group(start_in_mode: Callable[..., Daemon]) -> None:
    d = start_in_mode()
    assert d.socket is not None
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.socket.parent).st_mode) == 0o700
    d.stop()
    g = start_in_mode("--socket-group", "1", "--socket", str(d.socket.parent / "g.sock"))
    assert g.socket is not None
    st = os.stat(g.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 1
    st = os.stat(g.socket.parent)  # the group passes through, lists nothing
    assert stat.S_IMODE(st.st_mode) == 0o710 and st.st_gid == 1


def test_a_stalled_handshake_or_request_is_cut_on_tls_too(
    start_in_mode: Callable[..., Daemon], certs: Path
) -> None:
    """The request deadline covers the TLS handshake and a request trickled
    through TLS: both connections are closed by the watchdog (no 408 is written
    into a TLS stream from another thread: just closed)."""
    import time

    tcp = (
        "--tcp", "127.0.0.1:0", "--request-timeout", "2",
        "--tls-cert", str(certs / "host.pem"), "--tls-key", str(certs / "host.key"),
        "--tls-ca", str(certs / "ca.pem"), "--allow-client", "admin",
    )  # fmt: skip
    d = start_in_mode(tcp=tcp)
    host, port = str(d.url).split("//")[1].rstrip("/").split(":")
    silent = socket.create_connection((host, int(port)), timeout=30)
    tls = tls_client(certs, "admin").wrap_socket(
        socket.create_connection((host, int(port)), timeout=30), server_hostname="host"
    )
    started = time.monotonic()
    tls.sendall(b"POST /fake HTTP/1.1\r\n")  # and nothing more
    for s in (silent, tls):
        try:
            got = s.recv(4096)
        except (ConnectionResetError, OSError):
            got = b""
        assert got == b"", got
    took = time.monotonic() - started
    silent.close()
    tls.close()
    assert took < 12, took  # cut at the 2 s deadline, not the 600 s socket backstop
    r = _stat(d, tls_client(certs, "admin"))
    assert r["Status"] == "Success", r
