"""The kernel tier's harness without a kernel: a stand-in guest
(fake_guest.py) runs the real agent's Steps over the real control channel,
so the failure reports (the step that was running, the console's tail), the
deadline and the checkpoints are checked in a second, not in a boot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import GuestFailure, Run, run_scenario

FAKE = Path(__file__).resolve().parent / "fake_guest.py"


def _run(tmp_path: Path, behaviour: str, **kw: Any) -> Run:
    def launcher(console: Path, sock: Path) -> list[str]:
        return [sys.executable, str(FAKE), str(sock), str(console), behaviour]

    try:
        return run_scenario(
            None, tmp_path / "g", tmp_path, "fake", {"p": 1}, launcher=launcher, **kw
        )
    finally:
        left = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(FAKE) in " ".join(p.info["cmdline"] or [])
        ]
        assert not left, f"the stand-in guest is still running: {left}"


def test_a_run_reports_steps_timings_and_checkpoints(tmp_path: Path) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    run = _run(tmp_path, "ok", on_checkpoint=lambda n, d: seen.append((n, d)))
    assert [s.name for s in run.steps] == ["fake: first"]
    assert run.result("fake: first")["scenario"] == "fake"
    assert run.result("fake: first")["timings"] == ["a call 0.25 s"]
    assert seen == [("fake: look", {"what": "a disk"})]
    assert run.kernel == "fake" and run.kernel_uptime == 1.5
    text = "\n".join(run.timings())
    assert "fake: first" in text and "host check at fake: look" in text


def test_a_failed_step_is_named_with_its_error_and_the_console_tail(
    tmp_path: Path,
) -> None:
    with pytest.raises(GuestFailure) as e:
        _run(tmp_path, "fail")
    msg = str(e.value)
    assert "failed in step [fake: second]: RuntimeError: disk on fire" in msg
    assert "fake: the disk is on fire" in msg.split("--- console tail")[1]
    assert "fake: first" in msg.split("--- steps so far:")[1]


def test_a_hung_step_is_named_when_the_deadline_passes(tmp_path: Path) -> None:
    with pytest.raises(GuestFailure) as e:
        _run(tmp_path, "hang", deadline=5)
    assert "failed in step [fake: hangs]: the deadline passed" in str(e.value)


def test_a_guest_that_dies_is_named_in_its_step(tmp_path: Path) -> None:
    with pytest.raises(GuestFailure) as e:
        _run(tmp_path, "die")
    msg = str(e.value)
    assert "failed in step [fake: dies]: the guest stopped (qemu exited 3)" in msg
    assert "fake: kernel panic" in msg


def test_a_failed_host_check_stops_the_run_and_tells_the_guest(tmp_path: Path) -> None:
    def check(name: str, data: dict[str, Any]) -> None:
        raise AssertionError("the disk holds no VHD")

    with pytest.raises(GuestFailure) as e:
        _run(tmp_path, "ok", on_checkpoint=check)
    assert (
        "failed in step [host check at fake: look]: AssertionError: the disk holds no VHD"
        in str(e.value)
    )
