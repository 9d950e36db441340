"""smcommon.progress: trackers write the progress file atomically, nest, and cost nothing unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from smcommon import progress


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    progress.set_sink(None)
    progress._sink_known = False


def test_no_sink_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    progress._sink_known = False
    with progress.track("copy", 100) as t:
        t.add(50)
    assert t.path is None
    assert list(tmp_path.iterdir()) == []


def test_tracker_writes_and_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pf = tmp_path / "p.json"
    monkeypatch.setenv(progress.ENV, str(pf))
    progress._sink_known = False
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    with progress.track("copy", 1000) as t:
        t.add(250)
        p = progress.read(pf)
        assert p is not None
        assert (p["what"], p["done"], p["total"], p["percent"]) == ("copy", 250, 1000, 25.0)
        t.set(500)
        assert progress.read(pf)["done"] == 500  # type: ignore[index]
    p = progress.read(pf)
    assert p is not None and p["done"] == 1000  # a step that ended is complete
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temp file left


def test_writes_are_rate_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pf = tmp_path / "p.json"
    progress.set_sink(pf)
    monkeypatch.setattr(progress, "INTERVAL", 3600.0)
    with progress.track("import", 100) as t:
        for _ in range(100):
            t.add(1)
        # INTERVAL has not passed since the first write: still 0 on file
        assert progress.read(pf)["done"] == 0  # type: ignore[index]


def test_inner_step_shows_then_outer_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pf = tmp_path / "p.json"
    progress.set_sink(pf)
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    with progress.track("copy", 100) as outer:
        outer.set(10)
        with progress.track("import", 50) as inner:
            inner.set(20)
            outer.set(30)  # hidden while the inner step runs
            assert progress.read(pf)["what"] == "import"  # type: ignore[index]
        outer.set(40)
        p = progress.read(pf)
        assert p is not None and (p["what"], p["done"]) == ("copy", 40)


def test_separate_files_do_not_interfere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    a = progress.Tracker("receive", 10, str(tmp_path / "a"))
    b = progress.Tracker("receive", 10, str(tmp_path / "b"))
    with a, b:
        a.set(3)
        b.set(7)
    assert json.loads((tmp_path / "a").read_text())["done"] == 10
    assert progress.read(tmp_path / "b")["done"] == 10  # type: ignore[index]


def test_read_refuses_garbage(tmp_path: Path) -> None:
    f = tmp_path / "p"
    assert progress.read(f) is None
    f.write_text("not json")
    assert progress.read(f) is None
    f.write_text('{"done": "x", "total": 1}')
    assert progress.read(f) is None
    f.write_text('[1, 2]')
    assert progress.read(f) is None
