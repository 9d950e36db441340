"""smctl's progress bar: the line it draws, and drawing only for our call."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest

from dispatcher import smctl_progress
from dispatcher.smctl_progress import ProgressBar, render

G = 1 << 30


def test_render_a_known_total() -> None:
    line = render({"what": "copy", "done": G, "total": 2 * G, "rate": 300e6, "eta": 3.6}, 80)
    assert line.startswith("copy  [")
    assert "50%" in line and "1G/2G" in line and "286.1M/s" in line and "eta 4s" in line
    bar = line[line.index("[") + 1 : line.index("]")]
    assert set(bar) == {"#", "."} and bar.count("#") * 2 == len(bar)
    assert len(line) < 80


def test_render_narrow_and_unknown_total() -> None:
    assert "[" not in render({"what": "copy", "done": G, "total": 2 * G}, 30)
    assert render({"what": "receive", "done": 5 * (1 << 20), "total": 0}, 80) == "receive  5M"
    assert len(render({"what": "copy", "done": 1, "total": 2, "eta": 7200}, 20)) <= 19


def test_bar_draws_our_call_and_erases_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smctl_progress, "PERIOD", 0.01)
    polls: list[int] = []

    def status() -> dict[str, Any]:
        polls.append(1)
        done = min(len(polls), 10) * 100
        return {
            "running": [
                {"dbg": "other", "progress": {"what": "import", "done": 1, "total": 2}},
                {"dbg": "me", "progress": {"what": "copy", "done": done, "total": 1000}},
                {"dbg": "me-too"},
            ]
        }

    out = io.StringIO()
    with ProgressBar("me", status, out):
        deadline = time.monotonic() + 10
        while len(polls) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    text = out.getvalue()
    assert "copy" in text and "import" not in text and "%" in text
    assert text.endswith("\r\x1b[K")  # erased at the end


def test_bar_survives_a_failing_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smctl_progress, "PERIOD", 0.01)

    def status() -> dict[str, Any]:
        raise OSError("dispatcher gone")

    out = io.StringIO()
    with ProgressBar("me", status, out):
        time.sleep(0.05)
    assert out.getvalue() == ""
