"""build_guest.py's cache and its detached mode, without building: the cache
holds an image for the script's key (a manifest), so the build itself is not
run; what is checked is how a caller finds it and how ``--detach`` returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from testenv import child_pids

SCRIPT = Path(__file__).resolve().parent / "build_guest.py"


def _fake_cached(cache: Path) -> Path:
    """An image directory under this script's key, as a build leaves it."""
    import build_guest

    d = cache / build_guest.key()
    d.mkdir(parents=True)
    manifest = {
        "key": build_guest.key(),
        "kernel_version": "6.1.0-test",
        "build_seconds": 1.0,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_detach_returns_a_process_that_is_not_a_child(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = _fake_cached(cache)
    log = tmp_path / "build.log"
    before = child_pids()
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--detach", str(log)],
        capture_output=True, text=True, timeout=60, check=True,
        env=dict(os.environ, SM_GUEST_CACHE=str(cache)),
    )  # fmt: skip
    pid = int(r.stdout.strip())
    assert pid not in child_pids() - before, (
        "the detached build is a child of its caller"
    )
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        not psutil.pid_exists(pid)
        or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    )
    assert "cached in" in log.read_text() and str(image) in log.read_text(), (
        log.read_text()
    )


def test_an_edit_of_the_script_is_a_new_key(tmp_path: Path) -> None:
    import build_guest

    copy = tmp_path / "build_guest.py"
    copy.write_text(SCRIPT.read_text() + "\n# an edit\n")
    out = subprocess.run(
        [sys.executable, "-c", "import build_guest; print(build_guest.key())"],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert out and out != build_guest.key()
