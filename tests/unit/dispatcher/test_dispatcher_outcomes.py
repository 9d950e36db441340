"""dispatcher.outcomes: records kept until delivered, found by a retry, bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dispatcher import wire
from dispatcher.outcomes import OutcomeStore, proc_start

OK = wire.dumps_response(wire.success("vdi-1"))


def never() -> bool:
    return False


def test_key_is_dbg_method_and_arguments() -> None:
    k = OutcomeStore.key
    assert k("t", "VDI.create", ({"a": 1, "b": 2},)) == k("t", "VDI.create", ({"b": 2, "a": 1},))
    assert k("t", "VDI.create", ({"a": 1},)) != k("u", "VDI.create", ({"a": 1},))
    assert k("t", "VDI.create", ({"a": 1},)) != k("t", "VDI.clone", ({"a": 1},))
    assert k("t", "VDI.create", ({"a": 1},)) != k("t", "VDI.create", ({"a": 2},))
    assert not OutcomeStore.recorded("VDI.stat")
    assert not OutcomeStore.recorded("Dispatcher.status")
    assert OutcomeStore.recorded("VDI.create")


def test_delivered_records_go_undelivered_stay(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path, "inst1")
    e = store.entry("k1", 1)
    store.started(e, os.getpid(), "t", "VDI.create", "sr1")
    e.outcome.write_bytes(OK)  # what the plugin does
    store.settle(e, True, OK)
    assert list(tmp_path.iterdir()) == []
    e = store.entry("k2", 2)
    store.started(e, os.getpid(), "t", "VDI.create", "sr1")
    store.settle(e, False, OK)  # the plugin wrote nothing: the dispatcher keeps it
    [u] = store.unclaimed()
    assert (u["dbg"], u["method"], u["sr"], u["outcome"]) == ("t", "VDI.create", "sr1", "Success")
    # a retry (any instance) finds it
    again = OutcomeStore(tmp_path, "inst2")
    found = again.previous("k2", 0, never)
    assert found is not None and found[1] == OK
    again.settle(found[0], True, found[1])
    assert again.unclaimed() == [] and list(tmp_path.iterdir()) == []


def test_retry_waits_for_the_first_run_of_an_earlier_instance(tmp_path: Path) -> None:
    old = OutcomeStore(tmp_path, "old")
    e = old.entry("k", 7)
    plugin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        old.started(e, plugin.pid, "t", "VDI.create", "sr1")
        new = OutcomeStore(tmp_path, "new")
        # the same instance's own running calls are not waited for
        assert old.previous("k", 0.2, never) is None
        t = time.monotonic()
        assert new.previous("k", 0.3, never) is None  # still running: gave up waiting
        assert time.monotonic() - t >= 0.3
        e.outcome.write_bytes(OK)  # the plugin answers
        found = new.previous("k", 5, never)
        assert found is not None and found[1] == OK
    finally:
        plugin.kill()
        plugin.wait()


def test_plugin_dead_without_answer_is_forgotten(tmp_path: Path) -> None:
    old = OutcomeStore(tmp_path, "old")
    e = old.entry("k", 1)
    p = subprocess.Popen(["true"])
    p.wait()
    old.started(e, p.pid, "t", "VDI.create", "sr1")
    assert proc_start(p.pid) is None
    new = OutcomeStore(tmp_path, "new")
    assert new.previous("k", 5, never) is None
    assert list(tmp_path.iterdir()) == []


def test_retention_is_bounded(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path, "i", ttl=3600, max_records=3)
    for n in range(6):
        e = store.entry(f"k{n}", n)
        store.settle(e, False, OK)
        os.utime(e.outcome, (time.time() - 100 + n, time.time() - 100 + n))
    old = store.entry("old", 99)
    store.settle(old, False, OK)
    os.utime(old.outcome, (time.time() - 7200, time.time() - 7200))
    store.prune()
    assert sorted(u["record"] for u in store.unclaimed()) == ["k3.i.3", "k4.i.4", "k5.i.5"]


def test_proc_start_of_a_live_process() -> None:
    assert isinstance(proc_start(os.getpid()), int)
    assert proc_start(2**22 + 12345) is None
