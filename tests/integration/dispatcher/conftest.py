"""Fixtures of the dispatcher's integration tests.

plugins_dir   a tmp plugins directory with FAKESR and OTHERSR (fake_plugin.py)
fake_logs     the directory where fake plugins record their pids and spans
dispatch_mode "warm" or "exec": every test using start_daemon runs in both
start_daemon  start ``python -m dispatcher`` (Unix socket + plain TCP on
              loopback: ``--insecure``; TLS: ``tcp=``, test_dispatcher_tls.py)
              with options (``--no-warm`` in exec mode; in warm mode it returns
              once the warm parents are ready); each daemon is stopped with
              SIGTERM at the end of the test, and the test fails if it did not
              exit 0 or left any process behind
start_in_mode the same, the mode given per daemon (``mode="warm"|"exec"``)
daemon        one daemon with the defaults of these tests
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatcher_testlib import (
    MODES,
    Daemon,
    alive,
    fake_pids,
    install_fake,
    processes_with_root,
    spawn_daemon,
)


@pytest.fixture
def fake_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "fake-logs"
    d.mkdir()
    monkeypatch.setenv("FAKE_LOG_DIR", str(d))
    return d


@pytest.fixture
def plugins_dir(tmp_path: Path, fake_logs: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    install_fake(d, "FAKESR")
    (d / "other").mkdir()
    install_fake(d / "other", "OTHERSR")
    (d / "README").write_text("not a plugin\n")
    return d


@pytest.fixture(params=MODES)
def dispatch_mode(request: pytest.FixtureRequest) -> str:
    """Every daemon test runs twice: plugin processes forked from warm parents,
    and executed (--no-warm)."""
    return str(request.param)


@pytest.fixture
def start_in_mode(
    sm_root: Path, plugins_dir: Path, fake_logs: Path
) -> Iterator[Callable[..., Daemon]]:
    """``start(*options, mode="warm"|"exec", plugins=..., check_banner=True)``."""
    started: list[Daemon] = []

    def start(
        *extra: str,
        mode: str = "warm",
        plugins: Path | None = None,
        check_banner: bool = True,
        tcp: tuple[str, ...] = ("--tcp", "127.0.0.1:0", "--insecure"),
    ) -> Daemon:
        pdir = plugins or plugins_dir
        args = [
            "--plugins-dir", str(pdir), *tcp,
            "--timeout", "20", "--cancel-grace", "0.5", "--stop-timeout", "5",
            *(["--no-warm"] if mode == "exec" else []),
            *extra,
        ]  # fmt: skip
        d = spawn_daemon(args, sm_root)
        started.append(d)
        if check_banner:
            assert "sm-dispatcher ready" in d.banner, (
                f"no banner; stderr: {d.proc.stderr.read() if d.proc.stderr else ''}"
            )
            if mode == "warm":
                # calls run by exec until the warm parents are ready: wait,
                # so that this mode's calls are forked ones
                d.wait_warm(len(d.status()["plugins"]))
        return d

    yield start
    problems = []
    for d in started:
        if d.proc.poll() is None:
            rc, err = d.stop()
            if rc != 0:
                problems.append(f"daemon exited {rc}: {err[-2000:]}")
    # nothing may outlive the daemons: no plugin, no grandchild, no warm parent
    time.sleep(0.05)
    left = [pid for pid in fake_pids(fake_logs) if alive(pid)]
    deadline = time.monotonic() + 10
    left_procs = processes_with_root(sm_root)
    while left_procs and time.monotonic() < deadline:
        time.sleep(0.05)  # a warm parent exits when it reads the end of its socket
        left_procs = processes_with_root(sm_root)
    for p in left_procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not problems, problems
    assert not left, f"fake plugin processes left running: {left}"
    assert not left_procs, f"processes left running: {[(p.pid, p.cmdline()) for p in left_procs]}"


@pytest.fixture
def start_daemon(
    start_in_mode: Callable[..., Daemon], dispatch_mode: str
) -> Callable[..., Daemon]:
    def start(
        *extra: str,
        plugins: Path | None = None,
        check_banner: bool = True,
        tcp: tuple[str, ...] = ("--tcp", "127.0.0.1:0", "--insecure"),
    ) -> Daemon:
        return start_in_mode(
            *extra, mode=dispatch_mode, plugins=plugins, check_banner=check_banner, tcp=tcp
        )

    return start


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon("--workers", "4", "--queue-timeout", "20")
