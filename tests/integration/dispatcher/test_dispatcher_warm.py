"""Warm plugin processes (dispatcher/warm.py, zygote.py): a forked child is what
an executed plugin is; a child's crash, hang, leak or os._exit touches no other
call and not its warm parent; freshness; the warm parent's own hygiene.
(Every other dispatcher test runs in both modes: conftest.dispatch_mode.)"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from dispatcher_testlib import FAKE, Daemon, alive, fake_pids, wait_until

pytestmark = pytest.mark.integration


def ok(r: dict[str, Any]) -> Any:
    assert r.get("Status") == "Success", r
    return r["Value"]


def fake_parent(d: Daemon) -> int:
    """The pid of FAKESR's ready warm parent."""
    [pid] = [
        w["pid"] for w in d.status()["warm"]
        if w["plugin"].endswith("FAKESR") and w["state"] == "ready"
    ]  # fmt: skip
    return int(pid)


def probe(d: Daemon) -> dict[str, Any]:
    return dict(ok(d.unix("/fake").Probe.self({"dbg": "probe"})))


def _comparable(p: dict[str, Any], root: Path) -> dict[str, Any]:
    out = dict(p)
    for k in ("pid", "ppid", "pgid", "random"):
        out.pop(k)
    env = dict(out["env"])
    env.pop("SM_PROGRESS_FILE")  # files per call
    env.pop("SM_OUTCOME_FILE")
    out["env"] = env
    out["fds"] = sorted(fd for fd, t in out["fds"].items() if not t.startswith("/proc/"))
    return out


def test_a_forked_child_is_what_an_executed_plugin_is(
    start_in_mode: Callable[..., Daemon], sm_root: Path
) -> None:
    warm = start_in_mode(mode="warm")
    warm_parent = warm.warm_parents()
    w1, w2 = probe(warm), probe(warm)
    assert [w["calls"] for w in warm.status()["warm"] if w["pid"] == fake_parent(warm)] == [2]
    warm.stop()
    execd = start_in_mode(mode="exec")
    e = probe(execd)
    assert execd.status()["warm"] == []
    for p in (w1, e):
        # its own process group; stdin, stdout, stderr and nothing else
        assert p["pgid"] == p["pid"]
        fds = {fd: t for fd, t in p["fds"].items() if not t.startswith("/proc/")}
        assert sorted(fds) == ["0", "1", "2"], p["fds"]
        assert all(t.startswith("pipe:") for t in fds.values()), fds
        assert p["threads"] == 1 and p["blocked"] == []
        assert p["env"]["SM_ROOT"] == str(sm_root)
        assert p["name"] == "__main__" and p["argv"][0].endswith("FAKESR")
    assert w1["pid"] not in warm_parent
    assert w1["random"] != w2["random"]  # reseeded in each child
    we, ee = _comparable(w1, sm_root), _comparable(e, sm_root)
    assert {k: (v, ee["env"].get(k)) for k, v in we["env"].items() if ee["env"].get(k) != v} == {}
    assert {k: v for k, v in ee["env"].items() if k not in we["env"]} == {}
    assert we == ee
    assert _comparable(w1, sm_root) == _comparable(w2, sm_root)


def test_the_warm_parent_holds_nothing(start_in_mode: Callable[..., Daemon]) -> None:
    d = start_in_mode(mode="warm")
    for _ in range(3):
        probe(d)

    def settled() -> list[int]:
        """The spares, once each warm parent has exactly one child, its idle
        spare (the last call's child is reaped, the next spare has come)."""
        spares, parents = d.spares(), d.warm_parents()
        if len(spares) != len(parents) or not parents:
            return []
        for pid in parents:
            kids = [c.pid for c in psutil.Process(pid).children()]
            if len(kids) != 1 or kids[0] not in spares:
                return []
        return spares

    spares = wait_until(settled, 10, "each warm parent with one idle spare")
    assert isinstance(spares, list)
    for pid in d.warm_parents():
        z = psutil.Process(pid)
        assert z.num_threads() == 1
        assert z.open_files() == []

        def fds(pid: int = pid) -> list[int]:
            return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))

        # /dev/null, /dev/null, the dispatcher's stderr, its socket (and for an
        # instant, as it hands a spare over, that spare's socket)
        wait_until(lambda f=fds: f() == [0, 1, 2, 3], 5, f"only fds 0-3 in {pid}: {fds()}")
        assert os.readlink(f"/proc/{pid}/fd/3").startswith("socket:")
    for pid in spares:  # the child forked ahead holds no more than its parent
        s = psutil.Process(pid)
        assert s.num_threads() == 1
        assert s.open_files() == []
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        assert len(fds) == 4 and fds[:3] == [0, 1, 2], fds
        assert os.readlink(f"/proc/{pid}/fd/{fds[3]}").startswith("socket:")
        assert os.getpgid(pid) == pid  # its own process group already


def test_crash_hang_exit_and_leak_touch_no_other_call(
    start_in_mode: Callable[..., Daemon],
) -> None:
    d = start_in_mode("--timeout", "3", mode="warm")
    zpid = fake_parent(d)
    rss0 = psutil.Process(zpid).memory_info().rss
    fake = d.unix("/fake")
    results: dict[str, Any] = {}

    def call(vdi: str) -> None:
        results[vdi] = d.unix("/fake").VDI.stat({"dbg": vdi, "sr": "sr1", "vdi": vdi})

    threads = [
        threading.Thread(target=call, args=(v,))
        for v in ("die", "sleep", "exit7", "leak", "ok", "nap")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["die"]["ErrorDescription"][1] == "PLUGIN_KILLED"
    assert results["sleep"]["ErrorDescription"][1] == "PLUGIN_TIMEOUT"
    assert results["exit7"]["ErrorDescription"][1] == "PLUGIN_FAILED"
    assert "exited with status 7" in results["exit7"]["ErrorDescription"][2]
    for v in ("leak", "ok", "nap"):
        assert ok(results[v])["vdi"] == v
    # the warm parent is the same, no bigger, and still forks
    assert fake_parent(d) == zpid
    assert psutil.Process(zpid).memory_info().rss < rss0 + (8 << 20)
    assert ok(fake.VDI.stat({"dbg": "t", "sr": "sr1", "vdi": "ok"}))["vdi"] == "ok"
    assert d.children() == [] and d.zombies() == []


def test_an_edited_plugin_is_run_by_the_next_call(
    start_in_mode: Callable[..., Daemon], plugins_dir: Path
) -> None:
    d = start_in_mode(mode="warm")
    [before] = [w for w in d.status()["warm"] if w["plugin"].endswith("FAKESR")]
    assert ok(d.unix("/fake").Echo.args({"dbg": "e"}))["version"] == 1
    exe = plugins_dir / "FAKESR"
    exe.write_text(exe.read_text().replace("VERSION = 1", "VERSION = 2"))
    assert ok(d.unix("/fake").Echo.args({"dbg": "e"}))["version"] == 2
    # the stale warm parent was replaced by a new one, which runs the new code
    def replaced() -> list[dict[str, Any]]:
        return [
            w for w in d.status()["warm"]
            if w["plugin"].endswith("FAKESR") and w["state"] == "ready" and w["pid"] != before["pid"]
        ]  # fmt: skip

    wait_until(replaced, what="a new warm parent of FAKESR")
    assert ok(d.unix("/fake").Echo.args({"dbg": "e"}))["version"] == 2
    assert not alive(before["pid"], grace=10)


def test_a_worn_warm_parent_forks_until_its_successor_is_ready(
    start_in_mode: Callable[..., Daemon],
) -> None:
    """After --warm-max-calls calls a warm parent is replaced, and no call runs
    by exec meanwhile: it goes on forking while its successor starts."""
    d = start_in_mode("--warm-max-calls", "3", mode="warm")
    first = fake_parent(d)
    parents: list[int] = []
    deadline = time.monotonic() + 60
    while len(set(parents)) < 3 and time.monotonic() < deadline:
        parents.append(probe(d)["ppid"])
    assert d.proc.pid not in parents  # an executed plugin's parent is the dispatcher
    assert parents[0] == first and len(set(parents)) == 3, parents
    # each generation served its calls, then its successor all the later ones
    generations = [p for i, p in enumerate(parents) if i == 0 or parents[i - 1] != p]
    assert len(generations) == 3, parents
    for pid in set(parents) - {parents[-1]}:  # a replaced parent exits with its last child
        assert not alive(pid, grace=10)
    assert d.children() == [] and d.zombies() == []


def test_a_plugin_whose_warm_parent_cannot_start_costs_no_start_per_call(
    start_in_mode: Callable[..., Daemon], plugins_dir: Path
) -> None:
    """A warm parent that could not start (here: a plugin that does not
    compile) is not started again by every call: the calls run by exec, and
    the status shows the dead one and why, until warm.START_BACKOFF passes."""
    d = start_in_mode(mode="warm")
    broken = plugins_dir / "BROKENSR"  # its warm parent starts with its first call
    broken.write_text(f"#!{sys.executable}\ndef (:\n")
    broken.chmod(0o755)

    def brokens() -> list[dict[str, Any]]:
        return [w for w in d.status()["warm"] if w["plugin"].endswith("BROKENSR")]

    r = d.unix("/broken").VDI.stat({"dbg": "b", "sr": "sr1", "vdi": "ok"})
    assert r["Status"] == "Failure" and "PLUGIN_FAILED" in r["ErrorDescription"], r
    [dead] = wait_until(lambda: [w for w in brokens() if w["state"] == "dead"], what="dead")
    assert "not ready" in dead["why"] or "started" in dead["why"], dead
    for _ in range(5):
        r = d.unix("/broken").VDI.stat({"dbg": "b", "sr": "sr1", "vdi": "ok"})
        assert "PLUGIN_FAILED" in r["ErrorDescription"], r  # by exec, as before
    assert [(w["pid"], w["state"]) for w in brokens()] == [(dead["pid"], "dead")]
    assert d.children() == [] and d.zombies() == []


def test_killing_the_warm_parent_mid_call(start_in_mode: Callable[..., Daemon]) -> None:
    d = start_in_mode(mode="warm")
    zpid = fake_parent(d)
    got: list[Any] = []
    t = threading.Thread(
        target=lambda: got.append(
            d.unix("/fake").VDI.stat({"dbg": "n", "sr": "sr1", "vdi": "nap"})
        )
    )
    t.start()
    wait_until(
        lambda: [r for r in d.status()["running"] if r["dbg"] == "n" and r["pids"]],
        what="the call running",
    )
    os.kill(zpid, signal.SIGKILL)
    t.join(30)
    assert ok(got[0])["vdi"] == "nap"  # the call itself did not notice
    # the next call runs (by exec, or forked by a new warm parent) ...
    assert ok(d.unix("/fake").VDI.stat({"dbg": "t", "sr": "sr1", "vdi": "ok"}))["vdi"] == "ok"
    # ... and a new warm parent takes over
    new = wait_until(
        lambda: [
            w["pid"] for w in d.status()["warm"]
            if w["plugin"].endswith("FAKESR") and w["state"] == "ready" and w["pid"] != zpid
        ],
        what="a new warm parent",
    )  # fmt: skip
    assert new
    assert d.children() == [] and d.zombies() == []


def test_a_dispatcher_killed_leaves_no_warm_process(
    start_in_mode: Callable[..., Daemon],
) -> None:
    """kill -9 of the dispatcher: its warm parents see the end of their
    control socket and their spares the end of theirs; all exit, reaped."""
    d = start_in_mode(mode="warm")
    for _ in range(3):
        probe(d)
    spares = d.spares()
    assert spares
    procs = psutil.Process(d.proc.pid).children(recursive=True)
    assert {p.pid for p in procs} >= set(spares) | set(d.warm_parents())
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()

    def gone() -> bool:
        return not [p for p in procs if alive(p.pid)]

    wait_until(gone, 10, "the warm parents and their spares to exit")


def test_twelve_parallel_clients(
    start_daemon: Callable[..., Daemon], fake_logs: Path
) -> None:
    d = start_daemon("--workers", "6")
    errors: list[str] = []

    def client(i: int) -> None:
        fake = d.unix("/fake")
        for n in range(8):
            vdi = "nap" if n == 3 else "ok"
            r = fake.VDI.stat({"dbg": f"c{i}", "sr": f"sr{i % 3}", "vdi": vdi})
            if r.get("Status") != "Success":
                errors.append(str(r))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(fake_pids(fake_logs)) >= 96
    time.sleep(0.05)
    assert d.children() == [] and d.zombies() == []
    assert [p for p in fake_pids(fake_logs) if alive(p, grace=1)] == []


def test_a_plugin_run_directly_still_works(plugins_dir: Path) -> None:
    import subprocess

    from dispatcher import wire

    body = wire.dumps_call("VDI.stat", {"dbg": "d", "sr": "s", "vdi": "ok"})
    r = subprocess.run([str(plugins_dir / "FAKESR")], input=body, capture_output=True, check=True)
    assert wire.parse_response(r.stdout).status == "Success"
    assert FAKE.exists()


ENV_PLUGIN = '''#!/usr/bin/env python3
import sys
import xmlrpc.client

params, method = xmlrpc.client.loads(sys.stdin.read())
value = {"executable": sys.executable, "method": method}
sys.stdout.write(xmlrpc.client.dumps(({"Status": "Success", "Value": value},), methodresponse=True))
'''


def test_env_python_plugins_run_the_package_interpreter(
    start_daemon: Callable[..., Daemon],
    plugins_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``#!/usr/bin/env python3`` plugin runs (forked or executed) with the
    dispatcher's interpreter, not the python3 first on PATH (here one that fails,
    standing for a version manager's shim)."""
    import sys

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python3").write_text("#!/bin/sh\necho 'not this python3' >&2\nexit 99\n")
    (shim / "python3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    (plugins_dir / "envpy").mkdir()
    exe = plugins_dir / "envpy" / "ENVPYSR"
    exe.write_text(ENV_PLUGIN)
    exe.chmod(0o755)
    d = start_daemon()
    for _ in range(2):
        v = ok(d.unix("/envpy").Who.am_i({"dbg": "w"}))
        assert v == {"executable": sys.executable, "method": "Who.am_i"}


def test_installed_plugins_need_no_python3_on_path(tmp_path: Path) -> None:
    import subprocess
    import sys

    from dispatcher_testlib import REPO

    from dispatcher.install import install

    dest = tmp_path / "installed"
    exes = install(REPO / "plugins", dest, sys.executable)
    assert dest / "ext" / "EXTSR" in exes
    for exe in exes:
        assert exe.read_bytes().split(b"\n", 1)[0] == f"#!{sys.executable}".encode()
        assert os.access(exe, os.X_OK)
    assert (dest / "ext" / "ext_driver.py").is_file()
    r = subprocess.run(
        [str(dest / "ext" / "EXTSR"), "Query.query"],
        capture_output=True, text=True, check=False,
        env={"PATH": str(tmp_path / "nothing-here"), "SM_ROOT": str(tmp_path / "root")},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert '"driver": "ext"' in r.stdout
