"""Every command block of README.md runs as written, in order (issue 7).

The README is run the way a new user runs it, in a copy of the repository
(sharing this run's ``.venv``):

- the ``sh`` block of "The two commands": ``scripts/run-main`` is started in
  the background (it runs in the foreground of its own terminal) and waited
  for until it says it is ready; the test command is run with
  ``--collect-only`` (running the whole suite from inside it would recurse;
  CI runs it for real);
- every ``console`` block, one ``$ `` command at a time, in one bash session
  (variables and ``cd`` carry over, as in a terminal): each command must exit
  0, and where the README shows output, the output (stdout and stderr) must
  be that, UUIDs standing for any UUID and runs of blanks for any blanks;
- every ``python`` block, with the venv's interpreter and the session's
  ``SM_ROOT``.

Then ``scripts/run-main`` is stopped with Ctrl-C (SIGINT) and must exit 0,
leaving no process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from testenv import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAIN_JOB = "scripts/run-main"
TEST_COMMAND = ".venv/bin/python -m pytest"


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def console_steps(body: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def normal(lines: list[str]) -> list[str]:
    return [" ".join(UUID.sub("<uuid>", line).split()) for line in lines]


def sandbox(tmp: Path) -> Path:
    """A copy of the repository's tracked files, sharing this run's venv."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    top = tmp / "repo"
    for name in filter(None, files):
        src, dst = REPO / name.decode(), top / name.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)  # mtimes kept: scripts/setup sees nothing to reinstall
    venv = Path(sys.executable).parent.parent
    (top / ".venv").symlink_to(venv)
    # scripts/setup reinstalls when the package's declaration is newer than its
    # stamp: that would point the shared venv at this temporary copy
    stamp = venv / ".installed"
    assert stamp.exists(), f"{venv} was not made by scripts/setup"
    older = stamp.stat().st_mtime - 1
    for name in ("setup.cfg", "pyproject.toml"):
        os.utime(top / name, (older, older))
    return top


def run_console(top: Path, steps: list[tuple[str, list[str]]], env: dict[str, str]) -> None:
    """Run the steps in one bash session; check exit codes and shown output."""
    out = top / ".readme-out"
    out.mkdir()
    script = []
    for i, (cmd, _expected) in enumerate(steps):
        script.append(f"{{ {cmd}\n}} >{out}/{i} 2>&1; echo $? >{out}/{i}.rc")
    r = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=top, env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for i, (cmd, expected) in enumerate(steps):
        got = (out / str(i)).read_text()
        rc = int((out / f"{i}.rc").read_text())
        assert rc == 0, f"README command failed (exit {rc}): $ {cmd}\n{got}"
        if expected:
            assert normal(got.splitlines()) == normal(expected), f"$ {cmd}"


def start_main_job(top: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [MAIN_JOB], cwd=top, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("sm-dispatcher ready"):
            return proc
    proc.kill()
    pytest.fail("scripts/run-main did not get ready:\n" + "".join(seen[-30:]))


def test_every_readme_command_block_runs_as_written(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    runnable = [(lang, body) for lang, body in blocks(text) if lang in ("sh", "console", "python")]
    first_lang, first = runnable[0]
    assert first_lang == "sh" and [ln.split("#")[0].strip() for ln in first.splitlines()] == [
        MAIN_JOB, TEST_COMMAND,
    ], "README's first command block is the two commands"  # fmt: skip

    top = sandbox(tmp_path)
    env = {
        "HOME": str(tmp_path), "PATH": os.environ["PATH"], "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
    }  # fmt: skip
    collect = subprocess.run(
        [*TEST_COMMAND.split(), "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=top, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert collect.returncode == 0, collect.stdout[-2000:] + collect.stderr[-2000:]

    main = start_main_job(top, env)
    try:
        session = dict(env, SM_ROOT=str(top / ".state"))
        steps = []
        for lang, body in runnable[1:]:
            if lang == "console":
                steps += console_steps(body)
            elif lang == "sh":
                steps += [(line, []) for line in body.splitlines() if line.strip()]
            else:  # python: run where the session is, when its turn comes
                py = top / f".readme-{len(steps)}.py"
                py.write_text(body)
                steps.append((f".venv/bin/python {py}", []))
        assert len(steps) > 10
        run_console(top, steps, session)
    finally:
        os.killpg(main.pid, signal.SIGINT)  # Ctrl-C in its terminal
        try:
            rc = main.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(main.pid, signal.SIGKILL)
            rc = main.wait()
    assert rc == 0
    left = [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] and str(top) in p.info["cwd"]]
    assert not left, f"processes left behind: {left}"
