"""Ownership: what the SR made is recorded before it is made; an SR of the
earlier version gets records for what its VDIs need, and nothing else; SR.scan
adopts a sound foreign <uuid>.vhd chain and nothing else."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from engine_helpers import BLOCK, K4, MiB, inline_gc, pat, read, write
from smcommon import vhd
from smcommon.engine import foreign
from smcommon.engine.sr import SrEngine


def new(eng: SrEngine, name: str = "d") -> str:
    return str(eng.create({"name_label": name, "virtual_size": 8 * MiB})["vdi"])


def test_every_volume_made_is_owned(eng: SrEngine) -> None:
    v = new(eng)
    s = eng.snapshot({"vdi": v})["vdi"]
    c = eng.clone({"vdi": s})["vdi"]
    eng.set_persistent(c, False)
    assert set(eng.store.volumes()) <= eng.owned.owned()
    assert {v, s, c} <= eng.owned.owned()
    eng.destroy(c)
    eng.destroy(s)
    assert eng.owned.owned() == set(eng.store.volumes()) == {v}


def test_an_sr_of_the_earlier_version_owns_what_its_vdis_need(
    eng: SrEngine, tmp_path: Path
) -> None:
    v = new(eng)
    write(eng, v, {0: pat("v0")})
    s = eng.snapshot({"vdi": v})["vdi"]
    # garbage the earlier version left (an unreferenced volume), and the
    # ownership records removed: the SR as the earlier version left it
    garbage = eng.store.new_name()
    eng.store.create(4 * MiB, garbage)
    shutil.rmtree(eng.owned.dir)
    nxt = SrEngine(eng.paths, eng.sr, eng.sr_dir, collect=inline_gc)
    assert not nxt.owned.ready()
    nxt.set_content_id(v, "x")  # the first change records the ownership
    base = nxt.store.tree()[v].parent
    assert base is not None
    assert nxt.owned.owned() == {v, s, base}
    nxt.destroy(s)
    # the unreferenced volume is foreign now: kept, and listed
    assert garbage in nxt.store.volumes()
    assert [f.name for f in foreign.survey(nxt)] == [f"{garbage}.vhd"]
    assert read(nxt, v, [0]) == [pat("v0")]


def test_scan_adopts_a_sound_chain_and_nothing_else(
    eng: SrEngine, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # a chain of two uuid-named images, made elsewhere, copied in
    p, c = str(uuid.uuid4()), str(uuid.uuid4())
    vhd.create(str(outside / f"{p}.vhd"), 8 * MiB)
    vhd.write(str(outside / f"{p}.vhd"), 0, pat("parent"))
    vhd.snapshot(str(outside / f"{p}.vhd"), str(outside / f"{c}.vhd"))
    vhd.write(str(outside / f"{c}.vhd"), BLOCK, pat("child"))
    for n in (p, c):
        shutil.copyfile(outside / f"{n}.vhd", eng.sr_dir / f"{n}.vhd")
    # a hidden one, and one whose parent stays outside
    h = str(uuid.uuid4())
    vhd.create(str(eng.sr_dir / f"{h}.vhd"), 4 * MiB)
    vhd.set_hidden(str(eng.sr_dir / f"{h}.vhd"), True)
    o, q = str(uuid.uuid4()), str(uuid.uuid4())
    vhd.create(str(outside / f"{q}.vhd"), 8 * MiB)
    vhd.snapshot(str(outside / f"{q}.vhd"), str(outside / f"{o}.vhd"))
    shutil.move(outside / f"{o}.vhd", eng.sr_dir / f"{o}.vhd")
    found = {f.name: f.why for f in foreign.survey(eng)}
    assert found[f"{c}.vhd"] == ""
    assert "parent of" in found[f"{p}.vhd"]
    assert "hidden" in found[f"{h}.vhd"]
    assert "outside" in found[f"{o}.vhd"]
    keys = [r["vdi"] for r in eng.scan()]
    assert keys == [c]
    assert {c, p} <= eng.owned.owned()
    assert read(eng, c, [0, BLOCK]) == [pat("parent"), pat("child")]
    # the adopted chain is the SR's own now: the collector may merge it
    eng.destroy(eng.snapshot({"vdi": c})["vdi"])
    assert read(eng, c, [0, BLOCK, 2 * BLOCK]) == [
        pat("parent"),
        pat("child"),
        bytes(K4),
    ]
    assert {f.name for f in foreign.survey(eng)} == {f"{h}.vhd", f"{o}.vhd"}
