"""The daemon driven with xmlrpc.client over its Unix socket and TCP, with fake
plugins that answer, sleep, die, print garbage or fail (fake_plugin.py)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from dispatcher_testlib import Daemon, alive, fake_pids, wait_until

from dispatcher import wire

pytestmark = pytest.mark.integration


def stat(
    proxy: xmlrpc.client.ServerProxy, vdi: str, dbg: str = "t", sr: str = "sr1"
) -> Any:
    return proxy.VDI.stat({"dbg": dbg, "sr": sr, "vdi": vdi})


def raw_post(
    d: Daemon, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    assert d.socket is not None
    conn = client_conn(d)
    conn.request("POST", path, body, headers or {"Content-Type": "text/xml"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def client_conn(d: Daemon) -> http.client.HTTPConnection:
    from dispatcher.client import _UnixConnection

    assert d.socket is not None
    return _UnixConnection(str(d.socket), timeout=30)


# -- relaying and routing --------------------------------------------------------


def test_unix_and_tcp_relay_a_plugin_answer(daemon: Daemon) -> None:
    for proxy in (daemon.unix("/fake"), daemon.tcp("/fake")):
        r = stat(proxy, "ok")
        assert r["Status"] == "Success"
        assert r["Value"]["vdi"] == "ok"
    assert daemon.children() == []


def test_response_is_relayed_byte_for_byte(daemon: Daemon, plugins_dir: Path) -> None:
    body = wire.dumps_call("VDI.stat", {"dbg": "b", "sr": "s", "vdi": "ok"})
    direct = subprocess.run(
        [str(plugins_dir / "FAKESR")], input=body, capture_output=True, check=True
    )
    status, relayed = raw_post(daemon, "/fake", body)
    assert status == 200
    assert relayed == direct.stdout


def test_plugin_in_a_subdirectory_and_env(daemon: Daemon, sm_root: Path) -> None:
    r = daemon.unix("/other").Echo.args({"dbg": "e", "x": "y"})
    assert r["Value"]["type"] == "other"
    assert r["Value"]["arg"] == {"dbg": "e", "x": "y"}
    assert r["Value"]["root"] == str(sm_root)


def test_a_kept_alive_client_outlives_the_idle_timeout(
    start_daemon: Callable[..., Daemon],
) -> None:
    """The daemon closes a connection idle past --idle-timeout; the client
    that kept it sends its next call on a new one (as xmlrpc.client does)."""
    import time

    from dispatcher import client

    d = start_daemon("--idle-timeout", "0.5")
    c = client.Client(d.socket, keep_alive=True)
    args = {"dbg": "idle", "sr": "sr1", "vdi": "ok"}
    assert c.call("VDI.stat", args, "/fake").value["Value"]["vdi"] == "ok"
    first = c._conn
    time.sleep(1.5)  # the daemon closed it meanwhile
    assert c.call("VDI.stat", args, "/fake").value["Value"]["vdi"] == "ok"
    assert c._conn is not None and c._conn is not first
    c.close()


def test_unknown_type_and_bad_path(daemon: Daemon) -> None:
    r = stat(daemon.unix("/nosuch"), "ok")
    assert r["Status"] == "Failure"
    assert r["ErrorDescription"][:2] == ["Backend_error", "UNKNOWN_SR_TYPE"]
    assert "fake" in r["ErrorDescription"][3]
    status, text = raw_post(daemon, "/a/../b", wire.dumps_call("SR.ls", {"dbg": "x"}))
    assert status == 404
    assert b"no such endpoint" in text


def test_route_by_sr_learnt_and_kept_on_disk(
    start_daemon: Callable[..., Daemon], sm_root: Path
) -> None:
    d = start_daemon()
    root = d.unix("/")
    r = stat(root, "ok", sr="sr-a")
    assert r["ErrorDescription"][:2] == ["Backend_error", "UNKNOWN_SR"]
    assert "sr-a" in r["ErrorDescription"][2]
    assert (
        d.unix("/other").SR.create(
            {"dbg": "c", "sr": "sr-a", "device_config": {}, "physical_size": 0}
        )["Status"]
        == "Success"
    )
    # a failed attach teaches nothing
    assert (
        d.unix("/fake").SR.attach({"dbg": "c", "sr": "refuse", "device_config": {}})[
            "Status"
        ]
        == "Failure"
    )
    r = root.Echo.args({"dbg": "e", "sr": "sr-a"})
    assert r["Value"]["type"] == "other"
    assert stat(root, "ok", sr="refuse")["ErrorDescription"][1] == "UNKNOWN_SR"
    table = json.loads((sm_root / "var/lib/sm/dispatcher/routes.json").read_text())
    assert table["srs"] == {"sr-a": {"type": "other"}}
    # a restarted daemon still knows the SR
    rc, _err = d.stop()
    assert rc == 0
    d2 = start_daemon()
    assert (
        d2.unix("/").Echo.args({"dbg": "e", "sr": "sr-a"})["Value"]["type"] == "other"
    )
    # SR.destroy forgets it
    assert d2.unix("/").SR.destroy({"dbg": "d", "sr": "sr-a"})["Status"] == "Success"
    assert stat(d2.unix("/"), "ok", sr="sr-a")["ErrorDescription"][1] == "UNKNOWN_SR"


def test_call_without_sr_on_root_is_a_clear_error(daemon: Daemon) -> None:
    r = daemon.unix("/").VDI.stat({"dbg": "x", "vdi": "ok"})
    assert r["ErrorDescription"][:2] == ["Backend_error", "INVALID_REQUEST"]
    assert "no sr argument" in r["ErrorDescription"][2]


def test_sr_ls_merges_and_query_lists_plugins(daemon: Daemon) -> None:
    for proxy in (daemon.unix("/"), daemon.tcp("/"), daemon.tcp("")):
        r = proxy.SR.ls({"dbg": "ls"})
        assert r["Status"] == "Success"
        assert sorted(r["Value"]) == ["fake-sr1", "other-sr1", "shared-sr"]
    q = daemon.unix("/").Query.query({"dbg": "q"})
    assert sorted(x["driver"] for x in q["Value"]) == ["fake", "other"]
    diag = daemon.unix("/").Query.diagnostics({"dbg": "q"})["Value"]
    assert (
        "fake is fine" in diag
        and "other is fine" in diag
        and "== dispatcher ==" in diag
    )


# -- misbehaving plugins ---------------------------------------------------------


@pytest.mark.parametrize(
    ("vdi", "code", "words"),
    [
        ("die", "PLUGIN_KILLED", "SIGKILL"),
        ("garbage", "PLUGIN_BAD_RESPONSE", "not well-formed"),
        ("nothing", "PLUGIN_BAD_RESPONSE", "empty"),
        ("fail", "PLUGIN_FAILED", "status 1"),
    ],
)
def test_misbehaving_plugin_is_a_backend_error(
    daemon: Daemon, vdi: str, code: str, words: str
) -> None:
    r = stat(daemon.unix("/fake"), vdi)
    assert r["Status"] == "Failure"
    desc = r["ErrorDescription"]
    assert desc[:2] == ["Backend_error", code]
    assert words in desc[2]
    if vdi == "fail":
        assert "the backend is on fire" in desc[3]
    if vdi == "die":
        assert "dying now" in desc[3]
    # the daemon carries on
    assert stat(daemon.unix("/fake"), "ok")["Status"] == "Success"
    assert daemon.children() == [] and daemon.zombies() == []


def test_fault_from_a_plugin_is_relayed(daemon: Daemon) -> None:
    with pytest.raises(xmlrpc.client.Fault) as e:
        stat(daemon.unix("/fake"), "fault")
    assert e.value.faultString == "fake fault"


def test_timeout_kills_the_whole_group(
    start_daemon: Callable[..., Daemon], fake_logs: Path
) -> None:
    daemon = start_daemon("--timeout", "3")
    r = stat(daemon.unix("/fake"), "grandchild")
    desc = r["ErrorDescription"]
    assert desc[:2] == ["Backend_error", "PLUGIN_TIMEOUT"]
    assert "3s timeout" in desc[2]
    assert "started a grandchild" in desc[3]
    assert daemon.children() == []
    assert [p for p in fake_pids(fake_logs) if alive(p)] == []


def test_leftovers_of_a_finished_plugin_are_killed(daemon: Daemon) -> None:
    assert stat(daemon.unix("/fake"), "leaver")["Status"] == "Success"
    assert daemon.children() == []


def test_plugin_killed_from_outside_mid_call(daemon: Daemon) -> None:
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(
            r=stat(daemon.unix("/fake"), "sleep", dbg="victim")
        )
    )
    t.start()
    pids = wait_until(
        lambda: [p for r in status(daemon)["running"] for p in r["pids"]],
        what="a running call",
    )
    assert isinstance(pids, list)
    wait_until(
        lambda: Path(f"/proc/{pids[0]}/cmdline").read_bytes().find(b"FAKESR") >= 0,
        what="exec",
    )
    os.kill(pids[0], signal.SIGKILL)
    t.join(30)
    desc = result["r"]["ErrorDescription"]
    assert desc[:2] == ["Backend_error", "PLUGIN_KILLED"]
    assert daemon.children() == [] and daemon.zombies() == []


def status(d: Daemon) -> dict[str, Any]:
    r = d.unix("/").Dispatcher.status({"dbg": "st"})
    assert r["Status"] == "Success"
    return r["Value"]


# -- parallel calls and the bounded pool ----------------------------------------


def spans(fake_logs: Path) -> list[tuple[float, int]]:
    events = []
    for line in (fake_logs / "spans").read_text().splitlines():
        kind, t, _pid = line.split()
        events.append((float(t), 1 if kind == "start" else -1))
    return sorted(events)


def max_overlap(events: list[tuple[float, int]]) -> int:
    level = peak = 0
    for _t, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_parallel_clients_share_a_bounded_pool(daemon: Daemon, fake_logs: Path) -> None:
    results: list[Any] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        proxy = daemon.unix("/fake") if i % 2 else daemon.tcp("/fake")
        r = stat(proxy, "nap", dbg=f"p{i}")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12
    assert all(r["Status"] == "Success" for r in results)
    peak = max_overlap(spans(fake_logs))
    assert 2 <= peak <= 4  # ran in parallel, never more than --workers 4


def test_a_full_pool_makes_calls_wait_then_busy(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon("--workers", "1", "--queue-timeout", "1", "--timeout", "3")
    results: dict[str, Any] = {}
    t1 = threading.Thread(
        target=lambda: results.update(a=stat(d.unix("/fake"), "sleep", dbg="hog"))
    )
    t1.start()
    wait_until(lambda: status(d)["busy"] == 1, what="the slot taken")
    r = stat(d.unix("/fake"), "ok", dbg="waiter")
    assert r["ErrorDescription"][:2] == ["Backend_error", "DISPATCHER_BUSY"]
    t1.join(30)
    assert results["a"]["ErrorDescription"][1] == "PLUGIN_TIMEOUT"
    assert stat(d.unix("/fake"), "ok")["Status"] == "Success"


# -- request limits ------------------------------------------------------------------


def test_malformed_bodies_get_faults(daemon: Daemon) -> None:
    cases = {
        b"not xml": wire.FAULT_PARSE,
        b"<methodCall><methodName>x</methodName>": wire.FAULT_PARSE,
        b"<methodResponse><params/></methodResponse>": wire.FAULT_INVALID,
        b"": wire.FAULT_PARSE,
    }
    for body, code in cases.items():
        status_, data = raw_post(daemon, "/fake", body)
        assert status_ == 200
        with pytest.raises(xmlrpc.client.Fault) as e:
            xmlrpc.client.loads(data)
        assert e.value.faultCode == code, body
    assert stat(daemon.unix("/fake"), "ok")["Status"] == "Success"


LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">'
        % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]><methodCall><methodName>&lol9;</methodName><params/></methodCall>"
)
EXTERNAL = (
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    b"<methodCall><methodName>VDI.stat</methodName><params><param><value>&e;</value></param></params></methodCall>"
)


@pytest.mark.parametrize(
    "body", [LAUGHS, EXTERNAL], ids=["billion-laughs", "external-entity"]
)
def test_entities_are_refused(daemon: Daemon, body: bytes) -> None:
    _status, data = raw_post(daemon, "/fake", body)
    with pytest.raises(xmlrpc.client.Fault) as e:
        xmlrpc.client.loads(data)
    assert e.value.faultCode == wire.FAULT_UNSAFE
    assert "DTD" in e.value.faultString
    assert b"root:" not in data
    assert stat(daemon.unix("/fake"), "ok")["Status"] == "Success"


def test_oversized_body_gets_a_fault(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon("--max-body", "4096")
    big = {"dbg": "big", "sr": "s", "vdi": "ok", "pad": "x" * 100_000}
    with pytest.raises(xmlrpc.client.Fault) as e:
        d.unix("/fake").VDI.stat(big)
    assert e.value.faultCode == wire.FAULT_TOO_LARGE
    assert "limit of 4096 bytes" in e.value.faultString
    assert stat(d.tcp("/fake"), "ok")["Status"] == "Success"


def test_missing_content_length_and_get(daemon: Daemon) -> None:
    assert daemon.socket is not None
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(
        b"POST /fake HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert s.recv(100).startswith(b"HTTP/1.1 411")
    s.close()
    conn = client_conn(daemon)
    conn.request("GET", "/")
    assert conn.getresponse().status == 405
    conn.close()


# -- cancellation ------------------------------------------------------------------


def test_cancel_a_running_call(daemon: Daemon, fake_logs: Path) -> None:
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(
            r=stat(daemon.unix("/fake"), "ignoreterm", dbg="task-7")
        )
    )
    t.start()
    wait_until(
        lambda: any(
            r["dbg"] == "task-7" and r["pids"] for r in status(daemon)["running"]
        ),
        what="task-7",
    )
    wait_until(lambda: (fake_logs / "spans").exists(), what="the plugin to start")
    r = daemon.unix("/").Dispatcher.cancel({"dbg": "op", "task": "task-7"})
    assert r == {"Status": "Success", "Value": ""}
    t.join(30)
    assert result["r"] == {
        "Status": "Failure",
        "ErrorDescription": ["Cancelled", "task-7"],
    }
    assert [p for p in fake_pids(fake_logs) if alive(p)] == []
    assert daemon.children() == []


def test_cancel_unknown_task(daemon: Daemon) -> None:
    r = daemon.unix("/").Dispatcher.cancel({"dbg": "op", "task": "nope"})
    assert r["ErrorDescription"] == ["Does_not_exist", "task", "nope"]
    r = daemon.unix("/").Dispatcher.cancel({"dbg": "op"})
    assert r["ErrorDescription"][1] == "INVALID_REQUEST"


def test_cancel_a_call_waiting_for_a_slot(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon("--workers", "1", "--queue-timeout", "30")
    results: dict[str, Any] = {}
    t1 = threading.Thread(
        target=lambda: results.update(a=stat(d.unix("/fake"), "nap", dbg="first"))
    )
    t2 = threading.Thread(
        target=lambda: results.update(b=stat(d.unix("/fake"), "ok", dbg="queued"))
    )
    t1.start()
    wait_until(lambda: status(d)["busy"] == 1, what="the slot taken")
    t2.start()
    wait_until(lambda: status(d)["waiting"] == 1, what="a waiter")
    assert (
        d.unix("/").Dispatcher.cancel({"dbg": "op", "task": "queued"})["Status"]
        == "Success"
    )
    t2.join(30)
    t1.join(30)
    assert results["b"]["ErrorDescription"] == ["Cancelled", "queued"]
    assert results["a"]["Status"] == "Success"


# -- stopping --------------------------------------------------------------------------


def test_sigterm_lets_in_flight_calls_finish(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon(
        "--stop-timeout", "120"
    )  # the call must finish, however loaded the machine
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(r=stat(d.unix("/fake"), "nap", dbg="inflight"))
    )
    t.start()
    wait_until(lambda: status(d)["busy"] == 1, what="the call to start")
    d.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result["r"]["Status"] == "Success"
    rc, err = d.stop()
    assert rc == 0
    assert "stopped" in err
    assert d.socket is not None and not d.socket.exists()
    with pytest.raises(OSError):
        stat(d.unix("/fake"), "ok")
    assert not (d.root / "run/sm/sm-dispatcher.pid").exists()


def test_sigterm_cancels_calls_past_the_bound(
    start_daemon: Callable[..., Daemon], fake_logs: Path
) -> None:
    d = start_daemon("--stop-timeout", "0.5", "--timeout", "60")
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(r=stat(d.unix("/fake"), "ignoreterm", dbg="long"))
    )
    t.start()
    wait_until(lambda: (fake_logs / "spans").exists(), what="the plugin to start")
    pid = d.proc.pid
    children = psutil.Process(pid).children(recursive=True)
    assert children
    d.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result["r"]["ErrorDescription"][:2] == [
        "Backend_error",
        "DISPATCHER_STOPPING",
    ]
    rc, _err = d.stop()
    assert rc == 0
    assert not any(alive(c.pid) for c in children)


def test_one_log_line_per_call(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    stat(d.unix("/fake"), "ok", dbg="logme")
    stat(d.unix("/fake"), "missing", dbg="logme2")
    _rc, err = d.stop()
    lines = [x for x in err.splitlines() if "dbg=logme" in x]
    assert len(lines) == 2
    assert (
        "method=VDI.stat sr=sr1 plugin=fake duration=" in lines[0]
        and "outcome=Success" in lines[0]
    )
    assert lines[1].endswith("outcome=Vdi_does_not_exist")


def test_a_second_daemon_on_the_same_socket_refuses(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon()
    d2 = start_daemon("--tcp", "127.0.0.1:0", check_banner=False)
    rc, err = d2.stop()
    assert rc != 0
    assert "already listens" in err
    assert stat(d.unix("/fake"), "ok")["Status"] == "Success"


def test_kill_9_loses_no_acknowledged_route(
    start_daemon: Callable[..., Daemon], fake_logs: Path
) -> None:
    d = start_daemon()
    for i in range(5):
        r = d.unix("/fake").SR.attach(
            {"dbg": "k", "sr": f"sr-k{i}", "device_config": {}}
        )
        assert r["Status"] == "Success"
    d.proc.kill()  # SIGKILL right after the last acknowledgement
    d.proc.wait(30)
    assert d.socket is not None and d.socket.exists()  # stale, left behind
    d2 = start_daemon()  # finds the stale socket dead, replaces it
    for i in range(5):
        assert (
            d2.unix("/").Echo.args({"dbg": "k", "sr": f"sr-k{i}"})["Value"]["type"]
            == "fake"
        )


def test_client_gone_mid_call(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    body = wire.dumps_call("VDI.stat", {"dbg": "gone", "sr": "s", "vdi": "nap"})
    assert d.socket is not None
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.socket))
    s.sendall(
        b"POST /fake HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    s.close()  # the caller gives up before the answer
    wait_until(
        lambda: any(r["dbg"] == "gone" for r in status(d)["running"]),
        what="the call to start",
    )
    wait_until(lambda: status(d)["running"] == [], what="the call to end")
    assert stat(d.unix("/fake"), "ok")["Status"] == "Success"
    rc, err = d.stop()
    assert rc == 0
    assert "dbg=gone method=VDI.stat" in err
    assert "connection dropped by the client" in err
    assert "Traceback" not in err


def test_repeated_sigterm_still_exits_0(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    assert stat(d.unix("/fake"), "ok")["Status"] == "Success"
    for _ in range(20):  # systemd and impatient people signal again while we stop
        if d.proc.poll() is not None:
            break
        d.proc.send_signal(signal.SIGTERM)
        threading.Event().wait(0.01)
    rc, err = d.stop()
    assert rc == 0, err
    assert "stopped" in err
