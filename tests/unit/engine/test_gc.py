"""The collector: deletes what nobody needs, coalesces single children, skips
active chains, refuses to delete when it cannot see the whole tree, and
resumes a journaled coalesce; tree operations interrupted at every step
leave every VDI readable with all its data."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from engine_helpers import BLOCK, K4, MiB, hidden_volumes, inline_gc, pat, read, write
from smcommon.engine import vdipath
from smcommon.engine.gc import Collector
from smcommon.engine.sr import SrEngine
from smcommon.errors import BackendError

ZERO = b"\0" * K4


class Crash(BaseException):
    """Stands for a kill: not an Error, so nothing handles it."""


def new(eng: SrEngine, name: str = "d") -> str:
    return str(eng.create({"name_label": name, "virtual_size": 8 * MiB})["vdi"])


def gc(eng: SrEngine) -> object:
    with eng.tree_lock():
        return Collector(eng).run()


def fresh(eng: SrEngine) -> SrEngine:
    """The next process's view of the same SR."""
    return SrEngine(eng.paths, eng.sr, eng.sr_dir, collect=inline_gc)


def test_chain_collapses_and_data_stays(eng: SrEngine) -> None:
    v = new(eng)
    snaps = []
    for i in range(4):
        write(eng, v, {i * BLOCK: pat(f"v{i}")})
        snaps.append(eng.snapshot({"vdi": v})["vdi"])
    want = [pat(f"v{i}") for i in range(4)]
    for s in snaps:
        eng.destroy(s)
    assert hidden_volumes(eng) == []
    assert eng.store.volumes() == [v]
    assert read(eng, v, [i * BLOCK for i in range(4)]) == want


def test_gc_leaves_a_shared_parent_and_collapses_it_later(eng: SrEngine) -> None:
    a = new(eng)
    write(eng, a, {0: pat("a0")})
    s1 = eng.snapshot({"vdi": a})["vdi"]
    write(eng, a, {BLOCK: pat("a1")})
    c = eng.clone({"vdi": s1})["vdi"]
    write(eng, c, {2 * BLOCK: pat("c2")})
    eng.destroy(s1)
    rep = gc(eng)
    assert not rep.errors  # type: ignore[attr-defined]
    assert read(eng, a, [0, BLOCK, 2 * BLOCK]) == [pat("a0"), pat("a1"), ZERO]
    assert read(eng, c, [0, BLOCK, 2 * BLOCK]) == [pat("a0"), ZERO, pat("c2")]
    eng.destroy(c)
    assert hidden_volumes(eng) == []
    assert read(eng, a, [0, BLOCK]) == [pat("a0"), pat("a1")]


def test_active_chain_is_skipped_then_collected(eng: SrEngine) -> None:
    v = new(eng)
    write(eng, v, {0: pat("p0")})
    s = eng.snapshot({"vdi": v})["vdi"]
    vdipath.attach(eng, "vm", v, True)
    vdipath.activate(eng, "vm", v)
    chain_before = eng.store.chain(eng.get(v).volume)
    eng.destroy(s)
    assert eng.store.chain(eng.get(v).volume) == chain_before
    last = Collector(eng).last()
    assert last is not None and any("in use" in x for x in last["skipped"])
    vdipath.deactivate(eng, "vm", v)
    vdipath.detach(eng, "vm", v)
    gc(eng)
    assert len(eng.store.chain(v)) == 1
    assert read(eng, v, [0]) == [pat("p0")]


def test_nothing_deleted_when_a_record_is_unreadable(eng: SrEngine) -> None:
    v = new(eng)
    s = eng.snapshot({"vdi": v})["vdi"]
    (eng.meta.vdi_dir / f"{s}.json").write_text("{not json")
    before = sorted(eng.store.volumes())
    rep = gc(eng)
    assert sorted(eng.store.volumes()) == before
    assert any("unreadable" in x for x in rep.skipped)  # type: ignore[attr-defined]


def test_orphans_are_removed(eng: SrEngine) -> None:
    """Volumes the SR made that nobody needs, and temp files of killed
    processes, go; files the SR did not make stay."""
    v = new(eng)
    orphan = eng.store.new_name()
    eng.new_volumes(orphan)  # as every engine path does before it makes one
    eng.store.create(4 * MiB, orphan)  # no record names it: a kill left it
    (eng.sr_dir / f"{v}.vhd.new").write_bytes(b"partial")
    (eng.sr_dir / ".vhd-tmp-0123456789abcdef").write_bytes(b"partial")
    (eng.meta.vdi_dir / ".y.json.1.tmp").write_bytes(b"partial")
    theirs = eng.store.create(4 * MiB)[0]  # made by someone else
    (eng.sr_dir / "x.vhd.new").write_bytes(b"someone else's")
    gc(eng)
    assert eng.store.volumes() == sorted([v, theirs])
    assert not (eng.sr_dir / f"{v}.vhd.new").exists()
    assert not (eng.sr_dir / ".vhd-tmp-0123456789abcdef").exists()
    assert not (eng.meta.vdi_dir / ".y.json.1.tmp").exists()
    assert (eng.sr_dir / "x.vhd.new").read_bytes() == b"someone else's"
    assert not eng.owned.is_owned(orphan)


@pytest.mark.parametrize("step", ["copy", "switch"])
def test_interrupted_coalesce_resumes(
    eng: SrEngine, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = new(eng)
    write(eng, v, {0: pat("base")})
    s = eng.snapshot({"vdi": v})["vdi"]
    write(eng, v, {BLOCK: pat("leaf")})
    target = "coalesce" if step == "copy" else "replace"
    real = getattr(type(eng.store), target)

    def crash_after(self: object, *a: object) -> object:
        real(self, *a)
        raise Crash(target)

    monkeypatch.setattr(type(eng.store), target, crash_after)
    with pytest.raises(Crash):
        eng.destroy(s)
    monkeypatch.setattr(type(eng.store), target, real)
    journal = json.loads(eng.meta.gc_file.read_text())
    assert journal["child"] == v and journal["kind"] == "leaf"
    nxt = fresh(eng)
    if step == "switch":
        # a switch left half done is finished by the next tree operation
        nxt.create({"name_label": "other", "virtual_size": MiB})
        assert not eng.meta.gc_file.exists()
    else:
        # a copy left half done waits for the collector: other calls go on
        nxt.create({"name_label": "other", "virtual_size": MiB})
        assert eng.meta.gc_file.exists()
        assert read(nxt, v, [0, BLOCK]) == [pat("base"), pat("leaf")]
        rep = gc(nxt)
        assert rep.resumed  # type: ignore[attr-defined]
        assert not eng.meta.gc_file.exists()
    assert read(nxt, v, [0, BLOCK]) == [pat("base"), pat("leaf")]
    assert nxt.store.chain(v) == [v]
    assert hidden_volumes(nxt) == []


def test_attach_abandons_a_pending_leaf_merge(
    eng: SrEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VDI attached while the collector copies its leaf is never held off:
    the merge is abandoned, and done again once the VDI is detached."""
    v = new(eng)
    write(eng, v, {0: pat("base")})
    s = eng.snapshot({"vdi": v})["vdi"]
    write(eng, v, {BLOCK: pat("leaf")})
    real = type(eng.store).coalesce

    def crash_after(self: object, *a: object) -> object:
        real(self, *a)  # type: ignore[arg-type]
        raise Crash("coalesce")

    monkeypatch.setattr(type(eng.store), "coalesce", crash_after)
    with pytest.raises(Crash):
        eng.destroy(s)
    monkeypatch.undo()
    nxt = fresh(eng)
    vdipath.attach(nxt, "vm", v, True)  # no GC_IN_PROGRESS
    vdipath.activate(nxt, "vm", v)
    write(nxt, v, {2 * BLOCK: pat("while attached")})
    rep = gc(nxt)
    assert any("abandoned" in x for x in rep.skipped), rep  # type: ignore[attr-defined]
    assert not eng.meta.gc_file.exists()
    assert len(nxt.store.chain(v)) == 2  # the running VM's leaf was left alone
    vdipath.deactivate(nxt, "vm", v)
    vdipath.detach(nxt, "vm", v)
    gc(nxt)
    assert nxt.store.chain(v) == [v]
    assert read(nxt, v, [0, BLOCK, 2 * BLOCK]) == [
        pat("base"),
        pat("leaf"),
        pat("while attached"),
    ]


def _steps_of(
    eng: SrEngine, op: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> int:
    """How many store/metadata steps ``op`` takes (it is run once, for real)."""
    count = 0
    for obj, names in _WATCHED(eng):
        for name in names:
            real = getattr(obj, name)

            def counting(*a: object, _real: Callable[..., object] = real) -> object:
                nonlocal count
                count += 1
                return _real(*a)

            monkeypatch.setattr(obj, name, counting)
    op()
    monkeypatch.undo()
    return count


def _WATCHED(eng: SrEngine) -> list[tuple[object, list[str]]]:
    return [
        (
            eng.store,
            [
                "push_down",
                "snapshot",
                "renew",
                "set_hidden",
                "set_parent",
                "remove",
                "replace",
                "coalesce",
            ],
        ),
        (eng.meta, ["put", "remove"]),
    ]


def _crash_at(eng: SrEngine, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 0
    for obj, names in _WATCHED(eng):
        for name in names:
            real = getattr(obj, name)

            def crashing(*a: object, _real: Callable[..., object] = real) -> object:
                nonlocal count
                count += 1
                if count == n:
                    raise Crash(f"step {n}")
                return _real(*a)

            monkeypatch.setattr(obj, name, crashing)


OPS = [
    "snapshot",
    "clone",
    "set_persistent",
    "epoch_begin",
    "compose",
    "destroy_snapshot",
]


@pytest.mark.parametrize("opname", OPS)
def test_a_kill_at_any_step_loses_no_data(
    eng: SrEngine, opname: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def setup(e: SrEngine) -> tuple[str, str, Callable[[], object]]:
        v = new(e, "v")
        write(e, v, {0: pat("v0")})
        other = new(e, "o")
        write(e, other, {BLOCK: pat("o1")})
        if opname == "epoch_begin":
            e.set_persistent(v, False)
        if opname == "destroy_snapshot":
            s = e.snapshot({"vdi": v})["vdi"]
            write(e, v, {BLOCK: pat("v1")})
        op = {
            "snapshot": lambda: e.snapshot({"vdi": v}),
            "clone": lambda: e.clone({"vdi": v}),
            "set_persistent": lambda: e.set_persistent(v, False),
            "epoch_begin": lambda: e.epoch_begin(v),
            "compose": lambda: e.compose(other, v),
            "destroy_snapshot": lambda: e.destroy(s),
        }[opname]
        return v, other, op

    v, other, op = setup(eng)
    want_v = read(eng, v, [0, BLOCK])
    steps = _steps_of(eng, op, monkeypatch)
    assert steps >= 1
    for n in range(1, steps + 1):
        for p in list(eng.sr_dir.iterdir()):
            if p.is_file():
                p.unlink()
        for p in eng.meta.vdi_dir.iterdir():
            p.unlink()
        e = fresh(eng)
        v, other, op = setup(e)
        _crash_at(e, n, monkeypatch)
        with pytest.raises(Crash):
            op()
        monkeypatch.undo()
        after = fresh(eng)
        got = read(after, v, [0, BLOCK])
        if opname == "epoch_begin":
            assert got in (want_v, [pat("v0"), ZERO]), n
        elif opname == "compose":
            assert got in (want_v, [pat("v0"), ZERO], [pat("v0"), pat("o1")]), (n, got)
        else:
            assert got == want_v, (n, got)
        assert read(after, other, [BLOCK]) == [pat("o1")], n
        gc(after)
        assert read(after, v, [0, BLOCK]) == got, n
        for rec in after.meta.records():
            assert after.store.check(rec.volume) == [], (n, rec.volume)
        unref = (
            set(after.store.volumes())
            - {r.volume for r in after.meta.records()}
            - {r.epoch_base for r in after.meta.records()}
        )
        tree = after.store.tree()
        assert all(any(n2.parent == u for n2 in tree.values()) for u in unref), n


def test_a_child_that_cannot_be_relinked_stays_on_its_parent(
    eng: SrEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interior merge whose switch cannot re-link one child (no room for
    its locators without moving blocks, an I/O error) keeps that child on C,
    keeps C, and reports it: every VDI reads the same."""
    v = new(eng)
    write(eng, v, {0: pat("v0")})
    s1 = eng.snapshot({"vdi": v})["vdi"]
    write(eng, v, {BLOCK: pat("v1")})
    s2 = eng.snapshot({"vdi": v})["vdi"]
    write(eng, v, {2 * BLOCK: pat("v2")})
    want_v, want_s2 = read(eng, v, [0, BLOCK, 2 * BLOCK]), read(eng, s2, [0, BLOCK])
    real = type(eng.store).set_parent

    def refuse_s2(self: object, child: str, parent: str, live_ok: bool = False) -> None:
        if child == s2:
            raise BackendError("VHD_UNSUPPORTED", ["no room"])
        real(self, child, parent, live_ok)  # type: ignore[arg-type]

    monkeypatch.setattr(type(eng.store), "set_parent", refuse_s2)
    eng.meta.remove(s1)  # what VDI.destroy does, the pass below observed
    rep = gc(eng)
    monkeypatch.undo()
    assert any("stays on" in e for e in rep.errors), rep  # type: ignore[attr-defined]
    assert read(eng, v, [0, BLOCK, 2 * BLOCK]) == want_v
    assert read(eng, s2, [0, BLOCK]) == want_s2
    assert not eng.meta.gc_file.exists()
    gc(eng)  # and later passes finish the job
    assert read(eng, v, [0, BLOCK, 2 * BLOCK]) == want_v
    assert read(eng, s2, [0, BLOCK]) == want_s2
    assert len(eng.store.chain(eng.get(v).volume)) == 2
