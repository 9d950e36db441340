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
    if g.built_now:
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
