"""VDI.copy to another host: two dispatchers ("hosts" a and b) on this machine,
each with its own SM_ROOT, default ext SR, TCP port and certificate of one
pool CA (scripts/make-certs); each lists the other as a peer in its
pool.json and lets it in.  a's plugin copies a VDI into b's SR through b's
``https://127.0.0.1:PORT/`` over mutual TLS (VDI.create, then PUT
/data/<sr>/<vdi>, then VDI.import_raw on b)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_testlib import (
    REPO,
    Daemon,
    make_certs,
    processes_with_root,
    spawn_daemon,
    tls_client,
    write_pool,
)
from smcommon import vhd

pytestmark = pytest.mark.integration

EXTSR = REPO / "plugins" / "ext" / "EXTSR"
MiB = 1 << 20


def ok(r: dict[str, Any]) -> Any:
    assert r.get("Status") == "Success", r
    return r["Value"]


HOSTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pool CA; certificates for hosts a, b, c and the tests' "admin"."""
    return make_certs(tmp_path_factory.mktemp("certs"), *HOSTS, "admin")


@pytest.fixture
def hosts(tmp_path: Path, certs: Path) -> Iterator[Callable[..., Daemon]]:
    """``start(name, *options, run_tmpfs=SIZE, peers=True)``: a dispatcher
    with SM_ROOT tmp/<name>/root, a default SR and TLS on a TCP port, letting
    in every host of HOSTS and "admin"; with ``peers``, every host started
    lists every other as a peer (pool.json is read by each copy).  With
    ``run_tmpfs``, its ``run`` directory is a tmpfs of that size (RAM, as
    /run is on a host; needs root)."""
    if not EXTSR.exists():
        pytest.skip(f"{EXTSR} does not exist yet")
    started: list[Daemon] = []
    mounts: list[Path] = []

    def start(
        name: str, *extra: str, run_tmpfs: str | None = None, peers: bool = True
    ) -> Daemon:
        root = tmp_path / name / "root"
        root.mkdir(parents=True)
        write_pool(root, certs, name, [*HOSTS, "admin"])
        if run_tmpfs:
            (root / "run").mkdir()
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={run_tmpfs}", "tmpfs", str(root / "run")],
                check=True,
            )
            mounts.append(root / "run")
        args = [
            "--plugins-dir", str(REPO / "plugins"),
            "--tcp", "127.0.0.1:0", "--timeout", "60", "--stop-timeout", "5",
            "--default-sr", str(tmp_path / name / "sr"), *extra,
        ]  # fmt: skip
        d = spawn_daemon(args, root)
        assert "sm-dispatcher ready" in d.banner, d.banner
        assert d.url and d.url.startswith("https://") and d.default_sr
        d.name = name  # type: ignore[attr-defined]
        started.append(d)
        if peers:
            for h in started:
                others = [(o.name, str(o.url)) for o in started if o is not h]  # type: ignore[attr-defined]
                write_pool(h.root, certs, h.name, [*HOSTS, "admin"], others)  # type: ignore[attr-defined]
        return d

    yield start
    problems = []
    for d in started:
        rc, err = d.stop()
        if rc != 0:
            problems.append(f"daemon exited {rc}: {err[-2000:]}")
        left = processes_with_root(d.root)
        for p in left:
            with contextlib.suppress(Exception):
                p.kill()
        if left:
            problems.append(f"processes left running: {[p.pid for p in left]}")
        imports = d.root / "var" / "lib" / "sm" / "import"
        if imports.is_dir() and list(imports.iterdir()):
            problems.append(f"spooled uploads left: {list(imports.iterdir())}")
    for m in mounts:
        subprocess.run(["umount", str(m)], check=False)
    assert not problems, problems


def _write(d: Daemon, sr: str, vdi: str, chunks: dict[int, bytes]) -> str:
    """Write through a datapath of ``d`` (attach_info params is the leaf image)."""
    sm = d.unix("/")
    a = {"dbg": "t", "sr": sr, "vdi": vdi, "dp": "writer"}
    params = ok(sm.VDI.attach(dict(a, read_write=True)))["params"]
    for off, data in chunks.items():
        vhd.write(params, off, data)
    ok(sm.VDI.detach(a))
    return params


def _raw(d: Daemon, sr: str, vdi: str, out: Path) -> bytes:
    url = ok(d.unix("/").VDI.get_url({"dbg": "t", "sr": sr, "vdi": vdi}))
    vhd.export_raw(urllib.parse.unquote(urllib.parse.urlparse(url).path), out)
    return out.read_bytes()


def _vdis(d: Daemon, sr: str) -> list[str]:
    return [x["vdi"] for x in ok(d.unix("/").SR.scan({"dbg": "t", "sr": sr}))]


def test_copy_to_another_host(hosts: Callable[[str], Daemon], tmp_path: Path) -> None:
    a, b = hosts("a"), hosts("b")
    sra, srb = a.default_sr, b.default_sr
    assert sra and srb and sra != srb
    sm = a.unix("/")
    size = 4 * MiB + 6 * MiB  # 5 blocks of 2 MiB
    v = ok(
        sm.VDI.create(
            {
                "dbg": "t",
                "sr": sra,
                "vdi_info": {
                    "name_label": "src",
                    "name_description": "to B",
                    "virtual_size": size,
                },
            }
        )
    )["vdi"]
    data = {
        0: os.urandom(4096),
        3 * MiB + 512: b"\xa5" * (2 * MiB),  # spans blocks 1 and 2
        size - 4096: b"tail" * 1024,  # the last sector run; block 3 stays zero
    }
    _write(a, sra, v, data)
    new = ok(sm.VDI.copy({"dbg": "t", "sr": sra, "vdi": v, "url": b.url, "dest": srb}))
    assert new in _vdis(b, srb)
    assert new not in _vdis(a, sra)
    info = ok(b.unix("/").VDI.stat({"dbg": "t", "sr": srb, "vdi": new}))
    assert info["name_label"] == "src" and info["name_description"] == "to B"
    assert info["virtual_size"] == size
    src_raw = _raw(a, sra, v, tmp_path / "a.raw")
    dst_raw = _raw(b, srb, new, tmp_path / "b.raw")
    assert len(src_raw) == size and src_raw == dst_raw
    assert dst_raw[6 * MiB : 8 * MiB] == bytes(2 * MiB)
    # the zero block stayed unallocated on B
    url = ok(b.unix("/").VDI.get_url({"dbg": "t", "sr": srb, "vdi": new}))
    leaf = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    with vhd.Image.open(leaf) as img:
        assert img.bat is not None
        assert sorted(img.bat.allocated()) == [0, 1, 2, 4]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_remote_is_a_clear_error(hosts: Callable[..., Daemon], certs: Path) -> None:
    """A peer listed in pool.json that does not answer: a clear error, fast."""
    a = hosts("a")
    sra = a.default_sr
    sm = a.unix("/")
    v = ok(sm.VDI.create({"dbg": "t", "sr": sra, "vdi_info": {"virtual_size": MiB}}))
    url = f"https://127.0.0.1:{_closed_port()}/"
    write_pool(a.root, certs, "a", [*HOSTS, "admin"], [("c", url)])
    started = time.monotonic()
    r = sm.VDI.copy(
        {"dbg": "t", "sr": sra, "vdi": v["vdi"], "url": url, "dest": "some-sr"}
    )
    assert time.monotonic() - started < 30
    assert r["Status"] == "Failure"
    assert r["ErrorDescription"][:2] == ["Backend_error", "REMOTE_COPY_FAILED"]
    assert (
        url in r["ErrorDescription"][2] and "cannot reach" in r["ErrorDescription"][2]
    )
    assert _vdis(a, sra) == [v["vdi"]]


def test_copy_goes_only_to_listed_peers(
    hosts: Callable[..., Daemon], certs: Path, tmp_path: Path
) -> None:
    """A URL that is not a peer in pool.json is refused before anything is
    sent (a live dispatcher there, plain http, another port of a peer's host);
    a peer whose certificate does not carry its cert_name is refused by TLS."""
    a, b = hosts("a"), hosts("b", peers=False)
    sm = a.unix("/")
    info = {"virtual_size": 2 * MiB}
    v = ok(sm.VDI.create({"dbg": "t", "sr": a.default_sr, "vdi_info": info}))["vdi"]
    assert b.url
    port = int(str(urllib.parse.urlparse(b.url).port))
    for url in (
        b.url,  # live, and a lets b in: but b is not one of a's peers
        b.url.replace("https://", "http://"),
        f"https://localhost:{port}/",
        "https://10.0.0.1:443/",
        "ftp://somewhere/",
    ):
        r = sm.VDI.copy(
            {"dbg": "t", "sr": a.default_sr, "vdi": v, "url": url, "dest": str(b.default_sr)}
        )
        assert r["Status"] == "Failure", (url, r)
        assert len(r["ErrorDescription"]) == 3, (url, r)
        code, text = r["ErrorDescription"][1:3]
        assert code in ("REMOTE_NOT_A_PEER", "REMOTE_URL_INVALID"), (url, r)
        assert "peer" in text or "https://HOST:PORT/" in text, (url, r)
    assert _vdis(b, str(b.default_sr)) == []
    # b listed under a name its certificate does not carry: TLS refuses it
    write_pool(a.root, certs, "a", [*HOSTS, "admin"], [("c", b.url)])
    r = sm.VDI.copy(
        {"dbg": "t", "sr": a.default_sr, "vdi": v, "url": b.url, "dest": str(b.default_sr)}
    )
    assert r["Status"] == "Failure", r
    assert r["ErrorDescription"][1] == "REMOTE_COPY_FAILED", r
    assert "certificate" in r["ErrorDescription"][2].lower(), r
    assert _vdis(b, str(b.default_sr)) == []
    # listed right, the copy goes through
    write_pool(a.root, certs, "a", [*HOSTS, "admin"], [("b", b.url)])
    new = ok(sm.VDI.copy(
        {"dbg": "t", "sr": a.default_sr, "vdi": v, "url": b.url, "dest": str(b.default_sr)}
    ))  # fmt: skip
    assert _vdis(b, str(b.default_sr)) == [new]


def test_failed_transfer_leaves_no_vdi_on_the_remote(
    hosts: Callable[[str], Daemon],
) -> None:
    a, b = hosts("a"), hosts("b")
    sm = a.unix("/")
    args = {"dbg": "t", "sr": a.default_sr, "vdi_info": {"virtual_size": 2 * MiB}}
    v = ok(sm.VDI.create(args))["vdi"]
    _write(a, str(a.default_sr), v, {0: b"x" * 4096})
    # the create fails (B does not know the SR): nothing is made on B
    r = sm.VDI.copy(
        {"dbg": "t", "sr": a.default_sr, "vdi": v, "url": b.url, "dest": "no-such-sr"}
    )
    assert r["Status"] == "Failure", r
    assert r["ErrorDescription"][1] == "REMOTE_COPY_FAILED"
    assert "UNKNOWN_SR" in r["ErrorDescription"][2]
    # the create works but B cannot spool the data (its import directory
    # is a file): the VDI made on B is destroyed again
    spool = b.root / "var" / "lib" / "sm" / "import"
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_text("in the way\n")
    try:
        r = sm.VDI.copy(
            {
                "dbg": "t",
                "sr": a.default_sr,
                "vdi": v,
                "url": b.url,
                "dest": b.default_sr,
            }
        )
    finally:
        spool.unlink()
    assert r["Status"] == "Failure", r
    assert r["ErrorDescription"][1] == "REMOTE_COPY_FAILED"
    assert (
        "(destroyed)" in r["ErrorDescription"][2] and b.url in r["ErrorDescription"][2]
    )
    assert _vdis(b, b.default_sr) == []
    assert _vdis(a, a.default_sr) == [v]


def _put(
    d: Daemon, path: str, length: int, body: bytes = b"", ctx: Any = None, name: str = ""
) -> tuple[int, str]:
    """Send the headers (and ``body``) of a PUT over TLS with ``ctx`` (a
    client certificate) to ``d`` (certificate ``name``); the status and text
    of the answer."""
    from dispatcher import client

    parsed = urllib.parse.urlparse(d.url)
    conn = client._TlsConnection(f"{parsed.hostname}:{parsed.port}", ctx, name, 30)
    try:
        conn.putrequest("PUT", path, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        if body:
            with contextlib.suppress(OSError):
                conn.send(body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_put_refuses_oversized_and_hostile(
    hosts: Callable[[str], Daemon], certs: Path
) -> None:
    b = hosts("b")
    srb = b.default_sr
    assert srb
    as_a = tls_client(certs, "a")

    def create() -> str:
        """A VDI of b made by a's call over TLS: a may upload into it, once."""
        sm = b.tcp("/", as_a, "b")
        info = {"virtual_size": 2 * MiB}
        return str(ok(sm.VDI.create({"dbg": "t", "sr": srb, "vdi_info": info}))["vdi"])

    vdi = create()
    code, text = _put(b, f"/data/{srb}/{vdi}", 2 * MiB + 1, ctx=as_a, name="b")
    assert code == 413 and "larger than VDI" in text
    for path in (
        f"/data/{srb}/..%2F..%2Fetc",
        f"/data/{srb}/../x",
        f"/data/..%2F/{vdi}",
        f"/data/.hidden/{vdi}",
        f"/data/{srb}/{vdi}/extra",
        "/data/" + "x" * 200 + f"/{vdi}",
    ):
        code, text = _put(b, path, 10, ctx=as_a, name="b")
        assert code in (400, 403, 404), (path, code, text)
    code, text = _put(b, f"/data/unknown-sr/{vdi}", 10, ctx=as_a, name="b")
    assert code == 403 and "not made by a VDI.create of a" in text
    code, text = _put(b, f"/data/{srb}/no-such-vdi", 10, ctx=as_a, name="b")
    assert code == 403 and "no-such-vdi" in text
    # a good small PUT works, and a second into the same VDI is refused
    first, vdi = vdi, create()
    body = b"\x01" * 4096
    code, text = _put(b, f"/data/{srb}/{vdi}", len(body), body, ctx=as_a, name="b")
    assert code == 200 and "Success" in text, text
    code, text = _put(b, f"/data/{srb}/{vdi}", len(body), body, ctx=as_a, name="b")
    assert code == 403 and "not made by a VDI.create of a" in text, text
    # another peer (c), or the made VDI's maker from a VDI.create on the Unix
    # socket (no grant), cannot send data into it
    vdi2 = create()
    as_c = tls_client(certs, "c")
    code, text = _put(b, f"/data/{srb}/{vdi2}", len(body), body, ctx=as_c, name="b")
    assert code == 403 and "not made by a VDI.create of c" in text, text
    info = {"virtual_size": MiB}
    mine = ok(b.unix("/").VDI.create({"dbg": "t", "sr": srb, "vdi_info": info}))
    code, text = _put(b, f"/data/{srb}/{mine['vdi']}", 10, b"x" * 10, ctx=as_a, name="b")
    assert code == 403, text
    # a's grant for vdi2 is still good: the refused PUTs did not use it
    code, text = _put(b, f"/data/{srb}/{vdi2}", len(body), body, ctx=as_a, name="b")
    assert code == 200 and "Success" in text, text
    # the plugin reads only files under <state_dir>/import
    r = b.unix("/").VDI.import_raw(
        {"dbg": "t", "sr": srb, "vdi": vdi, "path": "/etc/passwd"}
    )
    assert r["Status"] == "Failure" and "is not a file directly under" in str(r)
    assert sorted(_vdis(b, srb)) == sorted([first, vdi, vdi2, mine["vdi"]])


def test_clean_spool_removes_leftover_uploads(tmp_path: Path) -> None:
    from dispatcher import upload

    d = tmp_path / "import"
    d.mkdir()
    (d / "sr.vdi.1.raw").write_bytes(b"x")
    (d / "keep.txt").write_text("not an upload\n")
    upload.Spool(d, 1 << 30, 0).clean()
    upload.Spool(tmp_path / "missing", 1 << 30, 0).clean()
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]


def test_copy_of_a_disk_past_2_gib(hosts: Callable[[str], Daemon]) -> None:
    """Sizes and offsets past 2**31 cross as <i8>; a sparse disk stays sparse."""
    a, b = hosts("a"), hosts("b")
    sra, srb = str(a.default_sr), str(b.default_sr)
    size = 3 << 30
    v = ok(
        a.client()
        .call(
            "VDI.create",
            {
                "dbg": "t",
                "sr": sra,
                "vdi_info": {"name_label": "big", "virtual_size": size},
            },
        )
        .value
    )["vdi"]
    tail = os.urandom(4096)
    _write(a, sra, v, {0: b"head" * 1024, size - 4096: tail})
    new = ok(
        a.unix("/").VDI.copy(
            {"dbg": "t", "sr": sra, "vdi": v, "url": b.url, "dest": srb}
        )
    )
    stat = b.client().call("VDI.stat", {"dbg": "t", "sr": srb, "vdi": new}).value
    assert ok(stat)["virtual_size"] == size
    url = ok(b.unix("/").VDI.get_url({"dbg": "t", "sr": srb, "vdi": new}))
    leaf = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    assert vhd.read(leaf, size - 4096, 4096) == tail
    assert vhd.read(leaf, 0, 4096) == b"head" * 1024
    with vhd.Image.open(leaf) as img:
        assert img.bat is not None
        assert sorted(img.bat.allocated()) == [0, size // vhd.BLOCK_SIZE - 1]


def _filled(d: Daemon, size: int, data: int) -> str:
    """A new VDI of ``size`` on ``d``'s default SR whose first ``data`` bytes are not zero."""
    sr = str(d.default_sr)
    v = ok(
        d.unix("/").VDI.create(
            {"dbg": "t", "sr": sr, "vdi_info": {"name_label": "big", "virtual_size": size}}
        )
    )["vdi"]
    pattern = bytes(range(1, 256)) * (MiB // 255 + 1)
    _write(d, sr, v, {off: pattern[:MiB] for off in range(0, data, MiB)})
    return str(v)


@pytest.mark.root
def test_copy_of_a_disk_larger_than_the_run_directory(
    hosts: Callable[..., Daemon], tmp_path: Path
) -> None:
    """B's run directory is a 16 MiB tmpfs; 48 MiB of data still cross: the
    spool is on disk, under B's state directory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    a = hosts("a")
    b = hosts("b", run_tmpfs="16m")
    run = os.statvfs(b.root / "run")
    assert run.f_bavail * run.f_frsize < 16 * MiB + 1
    sra, srb = str(a.default_sr), str(b.default_sr)
    v = _filled(a, 64 * MiB, 48 * MiB)
    new = ok(a.unix("/").VDI.copy({"dbg": "t", "sr": sra, "vdi": v, "url": b.url, "dest": srb}))
    assert _raw(a, sra, v, tmp_path / "a.raw") == _raw(b, srb, new, tmp_path / "b.raw")


def test_spool_limit_ends_the_copy_cleanly(hosts: Callable[..., Daemon]) -> None:
    a = hosts("a")
    b = hosts("b", "--max-spool", str(4 * MiB))
    sra, srb = str(a.default_sr), str(b.default_sr)
    v = _filled(a, 16 * MiB, 16 * MiB)
    r = a.unix("/").VDI.copy({"dbg": "t", "sr": sra, "vdi": v, "url": b.url, "dest": srb})
    assert r["Status"] == "Failure", r
    assert r["ErrorDescription"][1] == "REMOTE_COPY_FAILED"
    assert "507" in r["ErrorDescription"][2] and "limit" in r["ErrorDescription"][2], r
    assert _vdis(b, srb) == []
    status = ok(b.unix("/").Dispatcher.status({"dbg": "t"}))
    assert status["spool"]["used"] == 0 and status["spool"]["uploads"] == 0


def test_progress_rises_through_status(
    hosts: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dispatcher.status shows a running copy's bytes done rising to its total,
    on the sending host (the plugin's "copy") and the receiving one (the
    dispatcher's "receive")."""
    monkeypatch.setenv("SM_PROGRESS_INTERVAL", "0.02")
    a, b = hosts("a"), hosts("b")
    sra, srb = str(a.default_sr), str(b.default_sr)
    size = 192 * MiB
    v = _filled(a, size, size)
    seen: dict[str, list[tuple[str, int, int]]] = {"a": [], "b": []}
    result: list[Any] = []

    def copy() -> None:
        args = {"dbg": "watch-me", "sr": sra, "vdi": v, "url": b.url, "dest": srb}
        result.append(a.unix("/", timeout=300).VDI.copy(args))

    t = threading.Thread(target=copy)
    t.start()
    watch_a, watch_b = a.client(), b.client()
    while t.is_alive():
        for name, c in (("a", watch_a), ("b", watch_b)):
            st = c.call("Dispatcher.status", {"dbg": "st"}).value["Value"]
            for r in st["running"]:
                p = r.get("progress")
                if r["dbg"] == "watch-me" and p:
                    seen[name].append((p["what"], p["done"], p["total"]))
        time.sleep(0.005)
    t.join()
    ok(result[0])
    copying = [(done, total) for what, done, total in seen["a"] if what == "copy"]
    assert copying, seen["a"]
    assert {total for _d, total in copying} == {size}
    dones = [d for d, _t in copying]
    assert dones == sorted(dones)  # never backwards
    assert len(set(dones)) >= 2 and any(0 < d < size for d in dones), dones
    receiving = [(done, total) for what, done, total in seen["b"] if what == "receive"]
    assert receiving and {total for _d, total in receiving} == {size}, seen["b"]
