"""Fixtures of the kernel tier (marker ``kernel``): the production paths in a
guest with a full Debian kernel under qemu (TCG). See docs/design.md,
"The kernel tier".

guest           the cached guest image (build_guest.py), built on first use
                in the session; needs root (debootstrap) and qemu-system-x86
run_guest       boots the guest and runs one scenario (harness.run_scenario)
                in the test's tmp directory; checks no qemu is left running

Every boot's timings (and the image build's) are printed in pytest's
terminal summary, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE / "guest")):
    if p not in sys.path:
        sys.path.insert(0, p)

import build_guest
import harness

TIMINGS: list[str] = []
PREBUILD_LOG = "guest-build.log"  # in pytest's base temp directory


class _Prebuild:
    """The cold-cache image build started at collection's end (see
    ``pytest_collection_finish``): its process and its log."""

    pid = 0
    log: Path | None = None
    started = 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier's tests run after every other test (their image build, on a
    cold cache, runs meanwhile)."""
    items.sort(key=lambda item: item.get_closest_marker("kernel") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """When tests of the tier will run after others and the image is not
    cached: start its build now, detached (not a child of pytest: tests that
    check what processes they leave see nothing of it), niced. The ``guest``
    fixture then waits for it through the cache's lock."""
    items = session.items
    kernel = [i for i in items if i.get_closest_marker("kernel")]
    if not kernel or len(kernel) == len(items) or os.geteuid() != 0:
        return
    if build_guest.cached() or session.config.getoption("collectonly"):
        return
    log = session.config._tmp_path_factory.getbasetemp() / PREBUILD_LOG  # type: ignore[attr-defined]
    r = subprocess.run(
        [sys.executable, str(HERE / "build_guest.py"), "--detach", str(log)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if r.returncode == 0 and r.stdout.strip().isdigit():
        _Prebuild.pid = int(r.stdout.strip())
        _Prebuild.log = log
        _Prebuild.started = time.monotonic()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A background build still running (the run was cut short): stop it;
    the next build removes what it left (build_guest._sweep)."""
    if not _Prebuild.pid:
        return
    with contextlib.suppress(psutil.Error, OSError):
        proc = psutil.Process(_Prebuild.pid)
        if "build_guest.py" in " ".join(proc.cmdline()):
            os.killpg(_Prebuild.pid, signal.SIGTERM)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("kernel tier timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def guest() -> build_guest.Guest:
    if os.geteuid() != 0:
        pytest.skip("the kernel tier needs root (debootstrap, loop devices)")
    t = time.monotonic()
    log: list[str] = []
    g = build_guest.ensure(log=log.append)
    took = time.monotonic() - t
    if _Prebuild.pid:
        lines = _Prebuild.log.read_text().splitlines() if _Prebuild.log else []
        TIMINGS.append(
            f"guest image: built in the background while the other tests ran "
            f"(build {g.build_seconds:.1f} s; started "
            f"{t - _Prebuild.started:.0f} s before the tier; the tier waited "
            f"{took:.1f} s), kernel {g.kernel_version}"
        )
        TIMINGS.extend(f"  {line}" for line in lines)
    elif g.built_now:
        TIMINGS.append(
            f"guest image: built (cold cache) in {took:.1f} s, kernel {g.kernel_version}"
        )
        TIMINGS.extend(f"  {line}" for line in log)
    else:
        TIMINGS.append(
            f"guest image: from the cache in {took:.1f} s ({g.dir}; its build took "
            f"{g.build_seconds:.0f} s), kernel {g.kernel_version}"
        )
    return g


def _qemu_of(workdir: Path) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == harness.QEMU and str(workdir) in " ".join(
                proc.info["cmdline"] or []
            ):
                out.append(proc)
    return out


RunGuest = Callable[..., harness.Run]


@pytest.fixture
def run_guest(
    guest: build_guest.Guest, tmp_path: Path, repo: Path
) -> Iterator[RunGuest]:
    workdir = tmp_path / "guest"

    def run(scenario: str, params: dict[str, Any], **kw: Any) -> harness.Run:
        t = time.monotonic()
        try:
            r = harness.run_scenario(guest, workdir, repo, scenario, params, **kw)
        except harness.GuestFailure:
            TIMINGS.append(f"{scenario}: FAILED after {time.monotonic() - t:.1f} s")
            raise
        TIMINGS.extend(r.timings())
        return r

    yield run
    left = _qemu_of(workdir)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"qemu left running: {[p.pid for p in left]}"
