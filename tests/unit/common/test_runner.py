from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from smcommon import runner
from smcommon.errors import CommandError, CommandTimeout
from testenv import child_pids, new_children


def test_run_captures_both_streams() -> None:
    res = runner.run(
        [
            sys.executable,
            "-c",
            "import sys; print('out'); print('err', file=sys.stderr)",
        ]
    )
    assert res == runner.Result(0, "out\n", "err\n")


def test_run_passes_input() -> None:
    res = runner.run(
        [sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"], input="abc"
    )
    assert res.out == "cba\n"


def test_disallowed_exit_code_raises_with_stderr() -> None:
    with pytest.raises(CommandError) as info:
        runner.run(
            [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
        )
    assert info.value.rc == 3
    assert info.value.err == "boom"
    assert "boom" in str(info.value)


def test_allowed_exit_code_returns() -> None:
    res = runner.run([sys.executable, "-c", "raise SystemExit(5)"], ok_codes=(0, 5))
    assert res.rc == 5


def test_shell_strings_are_refused() -> None:
    with pytest.raises(TypeError):
        runner.run("echo hi")  # type: ignore[arg-type]


def test_timeout_kills_the_whole_process_group() -> None:
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    before = child_pids()
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        runner.run([sys.executable, "-c", code], timeout=1.0)
    assert time.monotonic() - start < 30
    assert not new_children(before)


def test_secrets_are_masked_in_errors() -> None:
    with pytest.raises(CommandError) as info:
        runner.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.stderr.write(sys.argv[1]); sys.exit(1)",
                "s3cret",
            ],
            secrets=["s3cret"],
        )
    text = str(info.value) + " ".join(info.value.argv) + info.value.err
    assert "s3cret" not in text
    assert runner.MASK in text


def test_a_command_dies_with_its_killed_caller(tmp_path) -> None:
    """A plugin killed mid-call (dispatcher timeout, kill -9) must not leave
    its mkfs or mount running: the command gets PR_SET_PDEATHSIG."""
    pidfile = tmp_path / "pid"
    caller = (
        "import sys\n"
        "from smcommon import runner\n"
        "runner.run([sys.executable, '-c', "
        "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(60)', "
        f"{str(pidfile)!r}], timeout=120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", caller])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        command = psutil.Process(int(pidfile.read_text()))
        proc.kill()
        proc.wait()
        command.wait(timeout=10)  # raises TimeoutExpired if it outlived its caller
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_spawn_detached_outlives_its_caller_and_holds_nothing_of_it(tmp_path) -> None:
    """A detached command: own session, not our child, stdio on /dev/null,
    none of our descriptors (a pipe we hold stays at EOF once we close it)."""
    r, w = os.pipe()
    os.set_inheritable(w, True)  # even an inheritable fd does not reach it
    out = tmp_path / "out"
    script = (
        "import os, sys; "
        f"open({str(out)!r}, 'w').write('%d %d %d %s' % (os.getpid(), os.getppid(), "
        "os.getsid(0), os.readlink('/proc/self/fd/1')))"
    )
    pid = runner.spawn_detached([sys.executable, "-c", script])
    os.close(w)
    deadline = time.monotonic() + 30
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    got_pid, ppid, sid, stdout = out.read_text().split()
    assert int(got_pid) == pid
    assert int(sid) != os.getsid(0)  # a session of its own (not its leader)
    assert int(ppid) != os.getpid()
    assert stdout == "/dev/null"
    assert os.read(r, 1) == b""  # nobody else holds the pipe's write end
    os.close(r)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # never our child: nothing to reap


def test_spawn_detached_reports_an_exec_failure(tmp_path) -> None:
    with pytest.raises(CommandError) as e:
        runner.spawn_detached([str(tmp_path / "no-such-program")])
    assert e.value.rc == 127
