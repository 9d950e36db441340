"""FileStore: push_down keeps the leaf's name and data, renew empties it, the
tree cache never serves what this process changed."""

from __future__ import annotations

import pytest
from engine_helpers import BLOCK, K4, MiB, pat, read, write
from smcommon.engine import store as store_mod
from smcommon.engine.sr import SrEngine


def test_push_down_and_renew(eng: SrEngine) -> None:
    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    write(eng, v, {0: pat("a")})
    ino = (eng.sr_dir / f"{v}.vhd").stat().st_ino
    base = eng.store.push_down(v)
    assert (eng.sr_dir / f"{base}.vhd").stat().st_ino == ino  # the data did not move
    assert eng.store.chain(v) == [v, base]
    assert read(eng, v, [0]) == [pat("a")]
    write(eng, v, {BLOCK: pat("b")})
    eng.store.renew(v, base)
    assert read(eng, v, [0, BLOCK]) == [pat("a"), b"\0" * K4]
    assert not list(eng.sr_dir.glob("*.new"))


def test_tree_cache_never_serves_own_changes(
    eng: SrEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "CACHE_SETTLE_NS", 0)  # cache everything at once
    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    s = eng.snapshot({"vdi": v})["vdi"]
    t1 = eng.store.tree()
    assert (eng.sr_dir / ".sm" / "tree-cache.json").exists()
    base = t1[v].parent
    assert base is not None and t1[base].hidden and t1[s].parent == base
    eng.store.set_hidden(base, False)
    assert eng.store.tree()[base].hidden is False
    # a fresh store (another process) reads the same answers
    other = store_mod.FileStore(eng.sr_dir)
    assert {k: (n.parent, n.hidden) for k, n in other.tree().items()} == {
        k: (n.parent, n.hidden) for k, n in eng.store.tree().items()
    }


def test_recently_changed_volumes_are_not_cached(eng: SrEngine) -> None:
    import json

    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    eng.store.tree()
    cache_file = eng.sr_dir / ".sm" / "tree-cache.json"
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    assert v not in cached


def test_leftover_temp_of_a_killed_process_does_not_block(eng: SrEngine) -> None:
    from smcommon import vhd

    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    leaf = eng.store.path(v)
    vhd.snapshot(leaf, leaf[:-4] + ".vhd.new")  # what a kill inside renew leaves
    eng.snapshot({"vdi": v})
    eng.clone({"vdi": v})
    assert not list(eng.sr_dir.glob("*.new"))
