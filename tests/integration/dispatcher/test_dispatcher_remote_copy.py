"""VDI.copy to another host: two dispatchers ("hosts" A and B) on this machine,
each with its own SM_ROOT, default ext SR and TCP port; A's plugin copies a VDI
into B's SR through B's ``http://127.0.0.1:PORT/`` (VDI.create, then PUT
/data/<sr>/<vdi>, then VDI.import_raw on B)."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_testlib import REPO, Daemon, processes_with_root, spawn_daemon
from smcommon import vhd

pytestmark = pytest.mark.integration

EXTSR = REPO / "plugins" / "ext" / "EXTSR"
MiB = 1 << 20


def ok(r: dict[str, Any]) -> Any:
    assert r.get("Status") == "Success", r
    return r["Value"]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """``start(name)``: a dispatcher with SM_ROOT tmp/<name>/root and a default SR."""
    if not EXTSR.exists():
        pytest.skip(f"{EXTSR} does not exist yet")
    started: list[Daemon] = []

    def start(name: str) -> Daemon:
        root = tmp_path / name / "root"
        root.mkdir(parents=True)
        args = [
            "--plugins-dir", str(REPO / "plugins"),
            "--tcp", "127.0.0.1:0", "--timeout", "60", "--stop-timeout", "5",
            "--default-sr", str(tmp_path / name / "sr"),
        ]  # fmt: skip
        d = spawn_daemon(args, root)
        started.append(d)
        assert "sm-dispatcher ready" in d.banner, d.banner
        assert d.url and d.default_sr
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
        imports = d.root / "run" / "sm" / "import"
        if imports.is_dir() and list(imports.iterdir()):
            problems.append(f"spooled uploads left: {list(imports.iterdir())}")
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


def test_dead_remote_is_a_clear_error(hosts: Callable[[str], Daemon]) -> None:
    a = hosts("a")
    sra = a.default_sr
    sm = a.unix("/")
    v = ok(sm.VDI.create({"dbg": "t", "sr": sra, "vdi_info": {"virtual_size": MiB}}))
    url = f"http://127.0.0.1:{_closed_port()}/"
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
    spool = b.root / "run" / "sm" / "import"
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


def _put(d: Daemon, path: str, length: int, body: bytes = b"") -> tuple[int, str]:
    """Send the headers (and ``body``) of a PUT; the status and text of the answer."""
    parsed = urllib.parse.urlparse(d.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
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


def test_put_refuses_oversized_and_hostile(hosts: Callable[[str], Daemon]) -> None:
    b = hosts("b")
    srb = b.default_sr
    assert srb
    sm = b.unix("/")
    v = ok(
        sm.VDI.create({"dbg": "t", "sr": srb, "vdi_info": {"virtual_size": 2 * MiB}})
    )
    vdi = v["vdi"]
    code, text = _put(b, f"/data/{srb}/{vdi}", 2 * MiB + 1)
    assert code == 413 and "larger than VDI" in text
    for path in (
        f"/data/{srb}/..%2F..%2Fetc",
        f"/data/{srb}/../x",
        f"/data/..%2F/{vdi}",
        f"/data/.hidden/{vdi}",
        f"/data/{srb}/{vdi}/extra",
        "/data/" + "x" * 200 + f"/{vdi}",
    ):
        code, text = _put(b, path, 10)
        assert code in (400, 404), (path, code, text)
    code, text = _put(b, f"/data/unknown-sr/{vdi}", 10)
    assert code == 404 and "not known" in text
    code, text = _put(b, f"/data/{srb}/no-such-vdi", 10)
    assert code == 404 and "no-such-vdi" in text
    # a good small PUT works, and a second into the now non-empty VDI is refused
    body = b"\x01" * 4096
    code, text = _put(b, f"/data/{srb}/{vdi}", len(body), body)
    assert code == 200 and "Success" in text, text
    code, text = _put(b, f"/data/{srb}/{vdi}", len(body), body)
    assert code == 200 and "VDI_NOT_EMPTY" in text, text
    # the plugin reads only files under <run_dir>/import
    r = b.unix("/").VDI.import_raw(
        {"dbg": "t", "sr": srb, "vdi": vdi, "path": "/etc/passwd"}
    )
    assert r["Status"] == "Failure" and "is not a file directly under" in str(r)
    assert _vdis(b, srb) == [vdi]


def test_clean_spool_removes_leftover_uploads(tmp_path: Path) -> None:
    from dispatcher import upload

    d = tmp_path / "import"
    d.mkdir()
    (d / "sr.vdi.1.raw").write_bytes(b"x")
    (d / "keep.txt").write_text("not an upload\n")
    upload.clean_spool(d)
    upload.clean_spool(tmp_path / "missing")
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
