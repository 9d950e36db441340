"""dispatcher.warm and dispatcher.install without a daemon: which interpreter runs a
plugin, the rewritten first line, what a zygote imports."""

from __future__ import annotations

import ast
import importlib.util
import time
from pathlib import Path
from typing import ClassVar

import pytest

from dispatcher import warm
from dispatcher.install import rewrite
from dispatcher.warm import interpreter

ZYGOTE = Path(__file__).resolve().parents[3] / "dispatcher" / "zygote.py"


def plugin(tmp_path: Path, first: str) -> Path:
    p = tmp_path / "XSR"
    p.write_text(first + "\nprint('x')\n")
    return p


def test_interpreter_of_a_plugin(tmp_path: Path) -> None:
    own = "/opt/venv/bin/python"
    i = interpreter(plugin(tmp_path, "#!/usr/bin/env python3"), own)
    assert i is not None and (i.argv, i.python, i.via_env) == ([own], True, True)
    i = interpreter(plugin(tmp_path, "#!/usr/bin/env python3 -S"), own)
    assert i is not None and i.argv == [own, "-S"]
    i = interpreter(plugin(tmp_path, "#!/usr/bin/python3.11 -I"), own)
    assert i is not None and (i.argv, i.via_env) == (["/usr/bin/python3.11", "-I"], False)
    assert interpreter(plugin(tmp_path, "#!/bin/sh"), own) is None
    assert interpreter(plugin(tmp_path, "#!/usr/bin/env bash"), own) is None
    assert interpreter(plugin(tmp_path, "no shebang"), own) is None
    assert interpreter(tmp_path / "missing", own) is None


def test_rewrite_the_first_line() -> None:
    assert rewrite(b"#!/usr/bin/env python3\n", "/v/bin/python") == b"#!/v/bin/python\n"
    assert rewrite(b"#!/usr/bin/env python3 -S\n", "/v/bin/python") == b"#!/v/bin/python -S\n"
    assert rewrite(b"#!/bin/sh\n", "/v/bin/python") == b"#!/bin/sh\n"


def test_zygote_imports_a_plugins_top_level_imports() -> None:
    spec = importlib.util.spec_from_file_location("zygote_under_test", ZYGOTE)
    assert spec is not None and spec.loader is not None
    z = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(z)
    tree = ast.parse(
        "import os, sys\n"
        "try:\n    import smcommon\nexcept ImportError:\n    pass\n"
        "from smcommon import plugin\n"
        "from . import relative\n"
        "def f():\n    import json\n"
        "plugin.main(None)\n"
    )
    assert z._plugin_imports(tree) == [
        "os", "sys", "smcommon", "smcommon", "smcommon.plugin"
    ]  # fmt: skip


def test_exit_mark_ends_stderr_or_is_not_one() -> None:
    """A forked child's last stderr bytes say its status (zygote.EXIT_MARK);
    the dispatcher takes them only at the very end, and strips them."""
    from dispatcher.child import _exit_mark
    from dispatcher.zygote import EXIT_MARK

    err = bytearray(b"a warning\n" + EXIT_MARK % 7)
    assert _exit_mark(err) == 7 and err == b"a warning\n"
    for tail in (b"late output\n", b"\0"):  # not at the very end
        err = bytearray(b"x" + EXIT_MARK % 0 + tail)
        assert _exit_mark(err) is None and err == b"x" + EXIT_MARK % 0 + tail
    assert _exit_mark(bytearray(EXIT_MARK.replace(b"%d", b"seven"))) is None


def test_a_calls_environment_goes_as_a_change_to_its_zygotes(monkeypatch) -> None:
    """The dispatcher sends what differs from the zygote's environment
    (warm.env_change); the child applies it (zygote._change_environment)."""
    spec = importlib.util.spec_from_file_location("zygote_under_test", ZYGOTE)
    assert spec is not None and spec.loader is not None
    z = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(z)
    import json
    import os

    from dispatcher.warm import env_change

    monkeypatch.setenv("SM_KEEP", "same")
    monkeypatch.setenv("SM_GONE", "x")
    monkeypatch.setenv("SM_CHANGED", "old")
    base = dict(os.environ)  # the zygote's, as started
    want = {k: v for k, v in base.items() if k != "SM_GONE"}
    want.update(SM_CHANGED="new", SM_NEW="1")
    change = json.loads(json.dumps(env_change(base, want)))  # as sent
    assert change == {"set": {"SM_CHANGED": "new", "SM_NEW": "1"}, "unset": ["SM_GONE"]}
    assert env_change(base, dict(base)) == {"set": {}, "unset": []}
    z._change_environment(change["unset"], change["set"])
    assert dict(os.environ) == want
    assert os.getenv("SM_GONE") is None and os.getenv("SM_NEW") == "1"
    monkeypatch.delenv("SM_NEW")


def test_file_watch_sees_edits_and_replacements(tmp_path: Path) -> None:
    """A warm parent is stale once a file it loaded changes: written in place,
    replaced by a rename, touched; through inotify and through stat."""
    import os

    from dispatcher.warm import FileWatch

    for inotify in (True, False):
        files = [tmp_path / f"m{i}.py" for i in range(3)]
        for f in files:
            f.write_text("x = 1\n")
        for change in ("write", "rename", "touch"):
            w = FileWatch([str(f) for f in files])
            if not inotify:
                w.close()  # as where inotify is not to be had: stat
            assert w.changed() == ""
            target = files[1]
            if change == "write":
                with open(target, "a") as fh:
                    fh.write("y = 2\n")
            elif change == "rename":
                (tmp_path / "new").write_text("x = 33\n")  # another size: stat sees it too
                os.replace(tmp_path / "new", target)
            else:
                st = target.stat()
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            assert w.changed() == f"{target} changed", (inotify, change)
            assert w.changed() == f"{target} changed"  # and stays so
            w.close()


def test_a_spare_that_could_not_be_forked_is_not_waited_for(tmp_path: Path) -> None:
    """The zygote answers ``{"spare": 0}`` when its fork fails: the dispatcher
    stops waiting for that spare (else every call would wait IO_TIMEOUT)."""
    import array
    import json
    import select
    import socket

    from dispatcher.warm import Zygote

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    z = Zygote(tmp_path / "XSR", ["python3"], {})
    z._sock, z._poll = ours, select.poll()
    z._poll.register(ours, select.POLLIN)
    z._spare_asked = True
    theirs.send(json.dumps({"spare": 0}).encode())
    z._reply_spare()
    assert not z._spare_asked and z._spares == []
    # a real one: kept, with its socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    z._spare_asked = True
    theirs.sendmsg(
        [json.dumps({"spare": 4242}).encode()],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a.fileno()]))],
    )
    a.close()
    z._take_spares()
    assert not z._spare_asked and [pid for pid, _s in z._spares] == [4242]
    z._spares[0][1].send(b"x")
    assert b.recv(1) == b"x"
    for _pid, s in z._spares:
        s.close()
    for s in (ours, theirs, b):
        s.close()


class FakeZygote:
    """A zygote whose state the test sets: ``stale`` says ``why`` and whether
    it may fork meanwhile (worn) or not (its files changed)."""

    made: ClassVar[list[FakeZygote]] = []

    def __init__(self, plugin: Path, argv: list[str], env: dict[str, str]) -> None:
        self.state = "starting"
        self.why: tuple[str, bool] = ("", True)
        self.retired = ""
        self.was_ready = False
        self.ended = 0.0
        FakeZygote.made.append(self)

    def start(self) -> None:
        pass  # the test makes it ready

    def stale(self, max_calls: int, max_growth: int) -> tuple[str, bool]:
        return self.why if self.state == "ready" else (self.state, False)

    def retire(self, why: str) -> None:
        self.retired = why
        self.state = "draining"

    def as_struct(self) -> dict[str, str]:
        return {"state": self.state}


@pytest.fixture
def fake_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[warm.WarmPool, Path]:
    """A WarmPool whose zygotes are FakeZygotes, and a Python plugin."""
    monkeypatch.setattr(warm, "Zygote", FakeZygote)
    FakeZygote.made = []
    return warm.WarmPool("/usr/bin/python3", {}), plugin(tmp_path, "#!/usr/bin/env python3")


def worn_with_successor(
    pool: warm.WarmPool, exe: Path
) -> tuple[FakeZygote, FakeZygote]:
    """A ready zygote, worn, and the successor its next call started."""
    pool.spawner(exe)
    [first] = FakeZygote.made
    first.state, first.why = "ready", ("served 1000 calls", True)
    assert pool.spawner(exe) is first
    [_, succ] = FakeZygote.made
    return first, succ


def test_a_worn_zygote_forks_until_its_successor_is_ready(
    fake_pool: tuple[warm.WarmPool, Path],
) -> None:
    pool, exe = fake_pool
    assert pool.spawner(exe) is None  # the first one starts: this call is exec'd
    [first] = FakeZygote.made
    first.state = "ready"
    assert pool.spawner(exe) is first
    first.why = ("served 1000 calls", True)
    assert pool.spawner(exe) is first  # worn: it forks, and a successor starts
    assert pool.spawner(exe) is first
    [_, succ] = FakeZygote.made  # one successor, however many calls
    succ.state = "ready"
    assert pool.spawner(exe) is succ
    assert first.retired == "served 1000 calls"


def test_a_successor_started_before_the_files_changed_is_dropped(
    fake_pool: tuple[warm.WarmPool, Path],
) -> None:
    pool, exe = fake_pool
    first, succ = worn_with_successor(pool, exe)
    first.why = ("XSR changed", False)  # while the successor starts
    assert pool.spawner(exe) is None  # exec'd, and a new one starts
    [_, _, fresh] = FakeZygote.made
    assert first.retired == "XSR changed"
    succ.state = "ready"  # it may have imported the old files: never used
    assert pool.spawner(exe) is None and succ.retired
    fresh.state = "ready"
    assert pool.spawner(exe) is fresh and not fresh.retired


def test_a_successor_ready_after_its_predecessor_changed_is_dropped(
    fake_pool: tuple[warm.WarmPool, Path],
) -> None:
    pool, exe = fake_pool
    first, succ = worn_with_successor(pool, exe)
    succ.state = "ready"
    first.why = ("XSR changed", False)  # seen only as the successor is ready
    assert pool.spawner(exe) is None
    assert succ.retired and first.retired == "XSR changed"
    [_, _, fresh] = FakeZygote.made
    fresh.state = "ready"
    assert pool.spawner(exe) is fresh


def test_a_zygote_that_could_not_start_is_not_started_again_at_once(
    fake_pool: tuple[warm.WarmPool, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, exe = fake_pool
    pool.spawner(exe)
    [first] = FakeZygote.made
    first.state, first.ended = "dead", time.monotonic()  # it never became ready
    for _ in range(5):  # exec'd, and no zygote started per call
        assert pool.spawner(exe) is None
    assert len(FakeZygote.made) == 1
    assert [z["state"] for z in pool.status()] == ["dead"]  # shown, with its why
    monkeypatch.setattr(warm, "START_BACKOFF", 0.0)  # the back-off is over
    assert pool.spawner(exe) is None
    [_, second] = FakeZygote.made
    second.state, second.was_ready = "ready", True
    assert pool.spawner(exe) is second


def test_a_zygote_that_died_after_serving_is_replaced_by_the_next_call(
    fake_pool: tuple[warm.WarmPool, Path],
) -> None:
    pool, exe = fake_pool
    pool.spawner(exe)
    [first] = FakeZygote.made
    first.state, first.was_ready = "ready", True
    assert pool.spawner(exe) is first
    first.state, first.ended = "dead", time.monotonic()
    assert pool.spawner(exe) is None  # this call is exec'd; a new one starts now
    assert len(FakeZygote.made) == 2
