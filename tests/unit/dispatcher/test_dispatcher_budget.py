"""dispatcher.budget: short, normal and long methods; long ones sized by their disk."""

from __future__ import annotations

from pathlib import Path

from smcommon import progress

from dispatcher.budget import CHECK_EVERY, MAX_DISK, Limits


def test_classes_and_their_time() -> None:
    lim = Limits(timeout=300, short=60, min_rate=50e6, stall=600)
    assert lim.kind("VDI.stat") == "short"
    assert lim.kind("VDI.copy") == "long"
    assert lim.kind("VDI.create") == "normal"
    assert lim.budget("Query.query").allowed() == 60
    assert Limits(timeout=20).budget("VDI.stat").allowed() == 20  # never above timeout
    assert lim.budget("VDI.snapshot").allowed() == 300
    # a long call before it reports its size: time for the largest VHD
    assert lim.budget("VDI.copy").allowed() == 300 + MAX_DISK / 50e6
    assert lim.budget("VDI.copy").allowed() > 12 * 3600


def test_normal_deadline_is_final() -> None:
    b = Limits(timeout=5).budget("VDI.create")
    assert b.first(100.0) == 105.0
    assert b.check(105.0) is None
    assert "5s timeout" in b.why


def test_long_call_sized_by_its_progress(tmp_path: Path) -> None:
    pf = tmp_path / "p.json"
    lim = Limits(timeout=10, min_rate=1e6, stall=30)
    b = lim.budget("VDI.copy", pf)
    first = b.first(0.0)
    assert first == CHECK_EVERY  # looked at again soon, to read its progress
    # the plugin reports a 20 MB disk: 10 + 20 s in all
    progress.write(pf, {"what": "copy", "done": 1_000_000, "total": 20_000_000})
    assert b.check(first) == 20.0
    assert b.allowed() == 30.0
    progress.write(pf, {"what": "copy", "done": 2_000_000, "total": 20_000_000})
    assert b.check(20.0) == 30.0
    progress.write(pf, {"what": "copy", "done": 3_000_000, "total": 20_000_000})
    assert b.check(30.0) is None
    assert "30s timeout" in b.why and "20000000 bytes" in b.why


def test_long_call_killed_when_its_progress_stands_still(tmp_path: Path) -> None:
    pf = tmp_path / "p.json"
    b = Limits(timeout=10, min_rate=1.0, stall=25).budget("VDI.copy", pf)
    t = b.first(0.0)
    progress.write(pf, {"what": "copy", "done": 5, "total": 10_000})
    t = b.check(t)
    assert t is not None
    moved = t - CHECK_EVERY
    while t is not None and t < moved + 25:
        t = b.check(t)  # the same bytes done each time
    assert t is not None
    assert b.check(moved + 25) is None
    assert "no progress for 25s" in b.why
