"""dispatcher.child: one process per call, bounded and always reaped."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from testenv import child_pids, new_children

from dispatcher.child import Child

_before: set[int] = set()


@pytest.fixture(autouse=True)
def _baseline() -> None:
    """Children a session fixture (an NFS server) runs are not this test's."""
    _before.clear()
    _before.update(child_pids())


def no_children() -> bool:
    return not new_children(_before)


def dead(pid: int, within: float = 10.0) -> bool:
    """True once ``pid`` is gone or a zombie (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def test_feeds_stdin_and_collects_stdout() -> None:
    data = b"x" * 300_000  # more than a pipe buffer
    r = Child(["cat"], data, timeout=30).run()
    assert (r.rc, r.out, r.timed_out, r.cancelled) == (0, data, False, False)
    assert no_children()


def test_exit_status_and_stderr_tail() -> None:
    r = Child(
        ["sh", "-c", "yes e | head -c 100000 >&2; echo last words >&2; exit 4"],
        b"",
        timeout=30,
    ).run()
    assert r.rc == 4
    assert r.describe() == "exited with status 4"
    assert r.err_text().endswith("last words")
    assert len(r.err) <= 8192


def test_death_by_signal() -> None:
    r = Child(["sh", "-c", "kill -KILL $$"], b"", timeout=30).run()
    assert r.rc == -signal.SIGKILL
    assert r.describe() == "was killed by SIGKILL"


def test_timeout_kills_the_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    r = Child(
        ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], b"", timeout=0.5
    ).run()
    assert r.timed_out and r.rc == -signal.SIGKILL
    assert dead(int(pidfile.read_text()))
    assert no_children()


def test_leftovers_die_with_the_call(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    r = Child(
        ["sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! > {pidfile}; echo done"],
        b"",
        timeout=30,
    ).run()
    assert (r.rc, r.out) == (0, b"done\n")
    pid = int(pidfile.read_text())
    assert dead(pid)


def test_cancel_escalates_to_sigkill() -> None:
    c = Child(["sh", "-c", "trap '' TERM; sleep 60"], b"", timeout=60, grace=0.2)
    threading.Timer(0.2, c.cancel).start()
    r = c.run()
    assert r.cancelled
    assert r.rc == -signal.SIGKILL
    assert no_children()


def test_cancel_before_start_runs_nothing() -> None:
    c = Child(["sh", "-c", "exit 0"], b"", timeout=5)
    c.cancel()
    r = c.run()
    assert r.cancelled and r.rc is None


def test_output_is_bounded() -> None:
    r = Child(["yes"], b"", timeout=30, max_out=100_000).run()
    assert r.overflow
    assert len(r.out) == 100_000
    assert no_children()


def test_spawn_failure_is_reported(tmp_path: Path) -> None:
    exe = tmp_path / "noexec"
    exe.write_text("#!/bin/sh\n")
    r = Child([str(exe)], b"", timeout=5).run()
    assert r.rc is None and "Permission denied" in r.describe()


def test_child_that_ignores_stdin() -> None:
    r = Child(["true"], b"y" * 1_000_000, timeout=30).run()
    assert r.rc == 0


def test_environment_is_passed() -> None:
    r = Child(
        ["sh", "-c", "echo $SM_ROOT"],
        b"",
        timeout=5,
        env={"SM_ROOT": "/x", "PATH": "/usr/bin:/bin"},
    ).run()
    assert r.out == b"/x\n"


def test_the_pid_is_shown_only_once_the_call_is_started() -> None:
    """Dispatcher.status shows a call's pid (``shown_pid``) only after its
    on_start noted its outcome: a test (or an operator) who kills the
    dispatcher on seeing the pid leaves a run that a retry waits for.  The
    pid was shown before, and a CI run killed a dispatcher in between."""
    from dispatcher.child import Child

    seen: list[object] = []
    c = Child(["true"], b"", timeout=10, on_start=lambda pid: seen.append((pid, c.shown_pid)))
    c.run()
    assert seen == [(c.pid, None)] and c.shown_pid == c.pid


def test_the_request_is_in_the_pipe_before_the_call_shows_as_started(tmp_path: Path) -> None:
    """A dispatcher killed the instant after a call shows as started (its
    on_start) leaves a plugin that reads its whole request: the retry of that
    call is answered from the plugin's outcome (dispatcher/outcomes.py)."""
    import subprocess
    import sys

    out = tmp_path / "got"
    script = (
        "import os, sys\n"
        "from dispatcher.child import Child\n"
        f"c = Child(['sh', '-c', 'sleep 0.3; cat > {out}'], b'x' * 1000, timeout=10,\n"
        "          on_start=lambda pid: os._exit(0))  # killed right there\n"
        "c.run()\n"
    )
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 1000):
        time.sleep(0.05)
    assert out.read_bytes() == b"x" * 1000
