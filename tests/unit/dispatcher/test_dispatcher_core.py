"""dispatcher.core without HTTP: routing, learning, fan-out, failures, cancel.

Plugins here are tiny shell scripts that print a canned response, so these
tests are fast; the daemon with Python fakes and the real EXTSR is covered by
tests/integration/dispatcher.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dispatcher import wire
from dispatcher.core import Config, Dispatcher
from dispatcher.routes import RouteTable


def script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def answer(value: object) -> str:
    resp = wire.dumps_response(wire.success(value)).decode()
    return f"cat >/dev/null\ncat <<'EOF'\n{resp}EOF\n"


@pytest.fixture
def disp(tmp_path: Path) -> Dispatcher:
    plugins = tmp_path / "plugins"
    script(plugins / "AAASR", answer(["sr-a", "shared"]))
    script(plugins / "bbb" / "BBBSR", answer(["sr-b", "shared"]))
    script(plugins / "BADSR", "cat >/dev/null; echo broken >&2; exit 2\n")
    slow = answer(["sr-slow"]).replace("cat >/dev/null\n", "")
    script(
        plugins / "SLOWSR",
        f'body=$(cat)\ncase "$body" in *VDI.stat*) exec sleep 30;; esac\n{slow}',
    )
    (plugins / "NOTEXECSR").write_text("#!/bin/sh\n")
    cfg = Config(
        plugins_dir=plugins, timeout=10, workers=2, queue_timeout=5, cancel_grace=0.2
    )
    return Dispatcher(cfg, RouteTable(tmp_path / "routes.json"))


def handle(
    d: Dispatcher, route: str | None, method: str, **args: object
) -> wire.Response:
    out, _fields = d.handle(route, wire.dumps_call(method, {"dbg": "t", **args}))
    return wire.parse_response(out)


def test_plugin_discovery(disp: Dispatcher) -> None:
    assert disp.plugin_types() == ["aaa", "bad", "bbb", "slow"]
    assert disp.plugin_path("notexec") is None
    assert disp.plugin_path("bbb") is not None


def test_route_by_type_and_learning(disp: Dispatcher) -> None:
    r = handle(disp, "aaa", "SR.attach", sr="sr-1", device_config={})
    assert r.status == "Success"
    assert disp.routes.get("sr-1") == "aaa"
    r = handle(disp, None, "SR.scan", sr="sr-1")
    assert r.status == "Success"
    r = handle(disp, "aaa", "SR.destroy", sr="sr-1")
    assert disp.routes.get("sr-1") is None
    # a failed attach teaches nothing
    assert (
        handle(disp, "bad", "SR.attach", sr="sr-2", device_config={}).status
        == "Failure"
    )
    assert disp.routes.get("sr-2") is None
    # unsafe keys are never learnt
    handle(disp, "aaa", "SR.attach", sr="../x", device_config={})
    assert disp.routes.get("../x") is None


def test_errors_of_routing(disp: Dispatcher) -> None:
    assert handle(disp, "zzz", "SR.ls").error[:2] == [
        "Backend_error",
        "UNKNOWN_SR_TYPE",
    ]
    assert handle(disp, "notexec", "SR.ls").error[1] == "UNKNOWN_SR_TYPE"
    assert handle(disp, None, "VDI.stat", sr="nope", vdi="v").error[1] == "UNKNOWN_SR"
    assert handle(disp, None, "VDI.stat", vdi="v").error[1] == "INVALID_REQUEST"
    out, fields = disp.handle(None, wire.dumps_call("VDI.stat", "x", "y"))
    assert wire.parse_response(out).error[1] == "INVALID_REQUEST"
    assert fields["method"] == "VDI.stat"
    out, fields = disp.handle(None, b"junk")
    assert wire.parse_response(out).fault is not None
    assert fields["outcome"] == f"Fault:{wire.FAULT_PARSE}"


def test_plugin_failure_carries_stderr(disp: Dispatcher) -> None:
    r = handle(disp, "bad", "VDI.stat", sr="s", vdi="v")
    assert r.error[:2] == ["Backend_error", "PLUGIN_FAILED"]
    assert "exited with status 2" in r.error[2]
    assert r.error[3] == "broken"


def test_sr_ls_merges_and_skips_failures(disp: Dispatcher) -> None:
    r = handle(disp, None, "SR.ls")
    assert r.value["Value"] == ["sr-a", "shared", "sr-b", "sr-slow"]


def test_query_lists_plugins_with_errors(disp: Dispatcher) -> None:
    r = handle(disp, None, "Query.query")
    listing = r.value["Value"]
    assert [q["driver"] for q in listing] == ["aaa", "bad", "bbb", "slow"] or len(
        listing
    ) == 4
    bad = [q for q in listing if q.get("driver") == "bad"]
    assert bad and "PLUGIN_FAILED" in bad[0]["error"]


def test_cancel_running_and_unknown(disp: Dispatcher) -> None:
    got: dict[str, wire.Response] = {}
    t = threading.Thread(
        target=lambda: got.update(r=handle(disp, "slow", "VDI.stat", sr="s", vdi="v"))
    )
    t.start()
    deadline = time.monotonic() + 10
    while not any(r.children and r.children[0].pid for r in disp.running()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert handle(disp, None, "Dispatcher.cancel", task="t").value == {
        "Status": "Success",
        "Value": "",
    }
    t.join(10)
    assert got["r"].error == ["Cancelled", "t"]
    assert handle(disp, "aaa", "Dispatcher.cancel", task="t").error == [
        "Does_not_exist",
        "task",
        "t",
    ]
    assert disp.running() == []


def test_status_and_unknown_internal_method(disp: Dispatcher) -> None:
    st = handle(disp, None, "Dispatcher.status").value["Value"]
    assert st["plugins"] == ["aaa", "bad", "bbb", "slow"]
    assert st["workers"] == 2 and st["running"] == []
    assert handle(disp, None, "Dispatcher.nope").error == [
        "Unimplemented",
        "Dispatcher.nope",
    ]


def test_stopping_refuses_new_calls(disp: Dispatcher) -> None:
    disp.stopping = True
    assert handle(disp, "aaa", "SR.ls").error[1] == "DISPATCHER_STOPPING"
