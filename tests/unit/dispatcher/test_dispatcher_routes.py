"""dispatcher.routes: the SR -> type table, durable and corruption-tolerant."""

from __future__ import annotations

import json
from pathlib import Path

from dispatcher.routes import RouteTable


def test_learn_forget_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "d" / "routes.json"
    t = RouteTable(path)
    assert t.get("a") is None
    t.learn("a", "ext")
    t.learn("b", "nfs")
    t.set_default("/srv/x", "c", "ext")
    t2 = RouteTable(path)
    assert (t2.get("a"), t2.get("b"), t2.get("c")) == ("ext", "nfs", "ext")
    assert t2.default_for("/srv/x") == "c"
    t2.forget("c")
    t3 = RouteTable(path)
    assert t3.get("c") is None and t3.default_for("/srv/x") is None
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in path.parent.iterdir()] == [
        "routes.json"
    ]  # no temporary files left


def test_unchanged_learn_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    t = RouteTable(path)
    t.learn("a", "ext")
    before = path.stat().st_mtime_ns
    path.write_text(path.read_text())  # same content, new mtime
    mtime = path.stat().st_mtime_ns
    t.learn("a", "ext")
    assert path.stat().st_mtime_ns == mtime
    assert mtime >= before


def test_corrupt_table_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text("{not json")
    t = RouteTable(path)
    assert t.srs() == {}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("routes.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
