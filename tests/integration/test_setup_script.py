"""scripts/setup's parts that a fresh machine depends on (issue 7)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testenv import REPO

pytestmark = pytest.mark.integration

APT_WAIT = REPO / "scripts" / "apt-wait"
FRONTEND_LOCK = Path("/var/lib/dpkg/lock-frontend")


def _hold_lock(seconds: float) -> subprocess.Popen[bytes]:
    """Another process holding dpkg's frontend lock (as apt does: fcntl)."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(FRONTEND_LOCK)!r}, os.O_RDWR | os.O_CREAT, 0o640)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"held\n"
    return p


@pytest.fixture
def apt_is_ours() -> None:
    if os.geteuid() != 0:
        pytest.skip("taking dpkg's lock needs root")
    fd = os.open(FRONTEND_LOCK, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pytest.fail("apt is busy on this machine right now")
    finally:
        os.close(fd)


def test_apt_wait_waits_for_a_held_lock_then_runs(apt_is_ours: None) -> None:
    holder = _hold_lock(3)
    try:
        started = time.monotonic()
        r = subprocess.run(
            [str(APT_WAIT), "apt-get", "check"],
            capture_output=True, text=True, timeout=60, check=False,
            env=dict(os.environ, SM_APT_LOCK_WAIT="30"),
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert took >= 2.0  # it did wait for the holder
    assert f"apt is locked by {holder.pid} (python" in r.stderr
    assert r.stderr.count("waiting up to 30s") == 1


def test_apt_wait_gives_up_after_its_bound_naming_the_holder(apt_is_ours: None) -> None:
    holder = _hold_lock(60)
    try:
        started = time.monotonic()
        r = subprocess.run(
            [str(APT_WAIT), "apt-get", "check"],
            capture_output=True, text=True, timeout=60, check=False,
            env=dict(os.environ, SM_APT_LOCK_WAIT="2"),
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0
    assert took < 15
    assert f"still locked by {holder.pid} (python" in r.stderr and "after 2s" in r.stderr


def test_apt_wait_passes_other_failures_through_at_once() -> None:
    r = subprocess.run(
        [str(APT_WAIT), "sh", "-c", "echo E: something else >&2; exit 7"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode == 7 and r.stderr == "E: something else\n"
