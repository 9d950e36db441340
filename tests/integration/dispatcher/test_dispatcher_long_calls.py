"""Long and lost calls: a busy SR does not starve another; a retry after a lost
reply (dispatcher killed, caller gone) gets the first outcome, not a second VDI."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dispatcher_testlib import REPO, Daemon, alive, wait_until
from smcommon.engine import locks

from dispatcher import wire

pytestmark = pytest.mark.integration

EXTSR = REPO / "plugins" / "ext" / "EXTSR"
MiB = 1 << 20


def ok(r: dict[str, Any]) -> Any:
    assert r.get("Status") == "Success", r
    return r["Value"]


def status(d: Daemon) -> dict[str, Any]:
    return ok(d.unix("/").Dispatcher.status({"dbg": "st"}))


def test_a_busy_sr_does_not_starve_another(start_daemon: Callable[..., Daemon]) -> None:
    """SR A's calls hang (as calls waiting for a busy SR's lock do): A holds at
    most its share of the slots and B's calls still run at once."""
    d = start_daemon("--workers", "4", "--queue-timeout", "4")
    results: list[Any] = []

    def hog() -> None:
        results.append(
            d.unix("/fake").VDI.stat({"dbg": "hog", "sr": "sr-a", "vdi": "sleep"})
        )

    hogs = [threading.Thread(target=hog) for _ in range(8)]
    for t in hogs:
        t.start()
    try:
        wait_until(
            lambda: {q["key"]: (q["running"], q["waiting"]) for q in status(d)["queues"]}
            .get("sr-a") == (3, 5),
            what="SR A at its share (3 of 4 slots) with 5 calls queued",
        )
        for i in range(10):
            r = d.unix("/fake").VDI.stat({"dbg": f"b{i}", "sr": "sr-b", "vdi": "ok"})
            assert ok(r)["sr"] == "sr-b"
        st = status(d)
        assert st["share"] == 3
        assert [r["sr"] for r in st["running"] if r["state"] == "running"].count("sr-a") == 3
    finally:
        ok(d.unix("/").Dispatcher.cancel({"dbg": "t", "task": "hog"}))
        for t in hogs:
            t.join(30)
    # A's calls were cancelled (or gave up queueing), never answered by B's
    assert len(results) == 8
    for r in results:
        assert r["ErrorDescription"][0] == "Cancelled" or r["ErrorDescription"][1] == (
            "DISPATCHER_BUSY"
        ), r


# -- lost replies -------------------------------------------------------------------


@pytest.fixture
def ext_start(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> Callable[[], Daemon]:
    if not EXTSR.exists():
        pytest.skip(f"{EXTSR} does not exist yet")

    def start() -> Daemon:
        return start_daemon(
            "--default-sr", str(tmp_path / "default-sr"), "--timeout", "60",
            plugins=REPO / "plugins",
        )  # fmt: skip

    return start


def _second_sr(d: Daemon, tmp_path: Path) -> str:
    """An SR besides the default one (the test locks it; the default SR must stay free
    for the next dispatcher's start-up)."""
    sr = "b5e1c0de-0000-4000-8000-00000000000b"
    path = tmp_path / "sr2"
    path.mkdir()
    args = {"dbg": "t", "sr": sr, "device_config": {"path": str(path)}}
    ok(d.unix("/ext").SR.create(dict(args, physical_size=0)))
    ok(d.unix("/ext").SR.attach(args))
    return sr


def _names(d: Daemon, sr: str) -> list[str]:
    return sorted(v["name_label"] for v in ok(d.unix("/").SR.scan({"dbg": "t", "sr": sr})))


def _create_in_background(d: Daemon, args: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []

    def call() -> None:
        try:
            got.append(d.unix("/", timeout=120).VDI.create(args))
        except Exception as e:  # noqa: BLE001 -- the dispatcher is killed under it
            got.append(e)

    t = threading.Thread(target=call)
    t.start()
    return t, got


def _plugin_pid(d: Daemon, dbg: str) -> int:
    def pids() -> list[int]:
        return [p for r in status(d)["running"] if r["dbg"] == dbg for p in r["pids"]]

    found = wait_until(pids, what=f"the plugin of {dbg} running")
    assert isinstance(found, list)
    return found[0]


def test_retry_after_dispatcher_kill_gets_the_first_outcome(
    ext_start: Callable[[], Daemon], sm_root: Path, tmp_path: Path
) -> None:
    d = ext_start()
    sr = _second_sr(d, tmp_path)
    once = {"dbg": "retry-1", "sr": sr, "vdi_info": {"name_label": "once", "virtual_size": MiB}}
    twice = {"dbg": "retry-2", "sr": sr, "vdi_info": {"name_label": "twice", "virtual_size": MiB}}

    # 1. killed while the plugin waits for the SR lock; the retry reaches the
    # next dispatcher while the first run still goes on: it waits for it
    held = locks.tree_lock(locks.shared_lock_dir(tmp_path / "sr2"))  # the SR's lock, in the SR
    held.acquire()
    try:
        t, got = _create_in_background(d, once)
        pid = _plugin_pid(d, "retry-1")
        d.proc.kill()
        t.join(30)
        assert got and isinstance(got[0], Exception)  # the caller got no answer
        d2 = ext_start()
        t2, got2 = _create_in_background(d2, once)
        wait_until(
            lambda: [r["state"] for r in status(d2)["running"] if r["dbg"] == "retry-1"]
            == ["waiting-for-first-run"],
            what="the retry waiting for the first run",
        )
        assert alive(pid, grace=0)
    finally:
        held.release()
    t2.join(60)
    first = ok(got2[0])
    assert first["name_label"] == "once"
    assert _names(d2, sr) == ["once"]

    # 2. killed; the first run finishes before the retry: its outcome waits,
    # unclaimed, listed in the status and diagnostics, for the retry
    held.acquire()
    try:
        t, got = _create_in_background(d2, twice)
        pid = _plugin_pid(d2, "retry-2")
        d2.proc.kill()
        t.join(30)
    finally:
        held.release()
    assert not alive(pid, grace=30)
    d3 = ext_start()
    [u] = status(d3)["unclaimed"]
    assert (u["dbg"], u["method"], u["sr"], u["outcome"]) == ("retry-2", "VDI.create", sr, "Success")
    diag = ok(d3.unix("/").Query.diagnostics({"dbg": "t"}))
    assert "unclaimed outcomes" in diag and "dbg=retry-2 VDI.create" in diag
    second = ok(d3.unix("/").VDI.create(twice))
    assert second["name_label"] == "twice"
    assert _names(d3, sr) == ["once", "twice"]
    assert status(d3)["unclaimed"] == []
    # delivered: the same call again is a new call (another VDI)
    third = ok(d3.unix("/").VDI.create(twice))
    assert third["vdi"] != second["vdi"]
    assert _names(d3, sr) == ["once", "twice", "twice"]
    # the first retry's answer is the VDI that the first run made
    assert ok(d3.unix("/").VDI.stat({"dbg": "t", "sr": sr, "vdi": first["vdi"]}))


def test_caller_gone_before_the_reply_gets_it_on_retry(
    ext_start: Callable[[], Daemon], sm_root: Path, tmp_path: Path
) -> None:
    d = ext_start()
    sr = _second_sr(d, tmp_path)
    args = {"dbg": "gone-1", "sr": sr, "vdi_info": {"name_label": "g", "virtual_size": MiB}}
    body = wire.dumps_call("VDI.create", args)
    held = locks.tree_lock(locks.shared_lock_dir(tmp_path / "sr2"))
    held.acquire()
    try:
        assert d.socket is not None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        _plugin_pid(d, "gone-1")
        s.close()  # the caller gives up
    finally:
        held.release()
    wait_until(lambda: status(d)["unclaimed"], what="the outcome kept unclaimed")
    again = ok(d.unix("/").VDI.create(args))
    assert _names(d, sr) == ["g"]
    assert ok(d.unix("/").VDI.stat({"dbg": "t", "sr": sr, "vdi": again["vdi"]}))
    assert status(d)["unclaimed"] == []
    outcomes = sm_root / "var/lib/sm/dispatcher/outcomes"
    assert list(outcomes.iterdir()) == []
