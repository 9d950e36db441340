"""The engine over images blktap made or extended (tests/data/vhd-corpus).

An SR whose volumes are blktap's own images (base <- child <- grandchild,
made by vhd-util and written through libvhd, tapdisk's write path), and an SR
mixing our images with blktap's writes (a VM writes our VDI through tapdisk,
then we snapshot, clone and collect).  After every engine operation (snapshot,
clone, destroy with its GC coalesce and re-link, resize, copy, export, import)
each VDI reads what the manifest and a model of the writes say, and every
volume is one libvhd's rules accept (``vhd.check`` and the independent checker
of ``tests/libvhd_style.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import libvhd_style as lv
import pytest
import vhdcorpus as vc
from engine_helpers import BLOCK, MiB
from smcommon import timestamps, vhd
from smcommon.engine import remote
from smcommon.engine.meta import VdiRecord
from smcommon.engine.remote import import_dir
from smcommon.engine.sr import SrEngine

SIZE = 64 * MiB


def disk(eng: SrEngine, vdi: str) -> bytes:
    return vhd.read(eng.store.path(eng.get(vdi).volume), 0, SIZE)


def all_sound(eng: SrEngine) -> None:
    for v in eng.store.volumes():
        path = eng.store.path(v)
        assert vhd.check(path) == [], f"{v}: {vhd.check(path)}"
        assert lv.problems(path) == [], f"{v}: {lv.problems(path)}"


def sectors(first: int, count: int, tag: str) -> bytes:
    return b"".join(vc.sector_data(tag, s) for s in range(first, first + count))


@pytest.fixture
def blktap_sr(eng: SrEngine, corpus: Path) -> tuple[SrEngine, str]:
    """The corpus chain as an SR: grandchild is a VDI's leaf, child and base its
    hidden ancestors (as a host that ran tapdisk would leave them)."""
    for name in ("base.vhd", "child.vhd", "grandchild.vhd"):
        shutil.copyfile(corpus / name, eng.sr_dir / name)
    rec = VdiRecord(vdi="vm-disk", volume="grandchild", name_label="vm disk",
                    virtual_size=SIZE, created=timestamps.now(precise=True))
    eng.meta.put(rec)
    return eng, rec.vdi


def test_snapshot_clone_and_collect_a_blktap_chain(blktap_sr: tuple[SrEngine, str]) -> None:
    eng, vdi = blktap_sr
    model = vc.model("grandchild.vhd")
    assert disk(eng, vdi) == model
    snap = eng.snapshot({"vdi": vdi})["vdi"]
    clone = eng.clone({"vdi": snap})["vdi"]
    all_sound(eng)
    assert disk(eng, snap) == disk(eng, clone) == disk(eng, vdi) == model
    # tapdisk writes the VDI's new leaf (ours), we write the clone
    leaf = eng.store.path(eng.get(vdi).volume)
    lv.write(leaf, 4096 * 512, sectors(4096, 4096, "V"))         # a whole block
    lv.write(leaf, 30000 * 512, sectors(30000, 8, "W"))          # over child's F
    model[4096 * 512 : 8192 * 512] = sectors(4096, 4096, "V")
    model[30000 * 512 : 30008 * 512] = sectors(30000, 8, "W")
    vhd.write(eng.store.path(eng.get(clone).volume), 0, b"clone")
    all_sound(eng)
    # destroying the snapshot and the clone lets the GC coalesce the whole chain
    # (our leaf into blktap's grandchild, re-links over blktap's child and base)
    eng.destroy(clone)
    eng.destroy(snap)
    all_sound(eng)
    assert disk(eng, vdi) == model
    assert lv.read(eng.store.path(eng.get(vdi).volume), 0, SIZE) == model
    assert len(eng.store.volumes()) < 5


def test_resize_copy_export_import_of_a_blktap_vdi(blktap_sr: tuple[SrEngine, str],
                                                   tmp_path: Path) -> None:
    eng, vdi = blktap_sr
    model = vc.model("grandchild.vhd")
    volume = eng.get(vdi).volume
    eng.store.resize(volume, 1024 * MiB)          # the BAT grows past libvhd's locators
    all_sound(eng)
    assert disk(eng, vdi) == model
    copy = eng.import_image(eng.store.path(volume), eng.get(vdi))["vdi"]   # VDI.copy, local
    all_sound(eng)
    assert disk(eng, copy) == model
    raw = import_dir(eng.paths) / "upload.raw"
    raw.parent.mkdir(parents=True)
    vhd.export_raw(eng.store.path(volume), str(raw))            # what a remote copy streams
    assert vc.sha256(raw.read_bytes()[:SIZE]) == vc.entry("grandchild.vhd")["raw_sha256"]
    target = eng.create({"name_label": "copy in", "virtual_size": 1024 * MiB})["vdi"]
    remote.import_raw(eng, target, str(raw))                     # VDI.import_raw, receiving
    all_sound(eng)
    assert disk(eng, target) == model


def test_a_vm_writes_our_vdi_through_tapdisk_then_we_snapshot_and_collect(
        eng: SrEngine) -> None:
    """The mixed SR: our VDI, written the way tapdisk writes (libvhd: blocks at
    the end of the data, 4 KiB-aligned, batmap bits for full blocks), then our
    snapshot, more tapdisk writes into our snapshot-made leaf, our own writes,
    and the GC's coalesce when the snapshot goes."""
    vdi = eng.create({"name_label": "vm", "virtual_size": SIZE})["vdi"]
    model = bytearray(SIZE)

    def tapdisk(first: int, count: int, tag: str) -> None:
        data = sectors(first, count, tag)
        lv.write(eng.store.path(eng.get(vdi).volume), first * 512, data)
        model[first * 512 : (first + count) * 512] = data

    tapdisk(0, 4096, "A")                   # whole block 0: its batmap bit set
    tapdisk(5000, 8, "B")
    tapdisk(12280, 16, "C")                 # straddles blocks 2 and 3
    all_sound(eng)
    snap = eng.snapshot({"vdi": vdi})["vdi"]
    snap_model = bytes(model)
    tapdisk(4, 8, "D")
    tapdisk(4096 * 7, 4096, "E")
    vhd.write(eng.store.path(eng.get(vdi).volume), 3 * BLOCK + 100, b"ours")
    model[3 * BLOCK + 100 : 3 * BLOCK + 104] = b"ours"
    all_sound(eng)
    assert disk(eng, snap) == snap_model
    assert disk(eng, vdi) == model
    clone = eng.clone({"vdi": vdi})["vdi"]
    eng.destroy(snap)
    eng.destroy(clone)
    all_sound(eng)
    assert eng.store.volumes() == [eng.get(vdi).volume]        # collapsed to one image
    assert disk(eng, vdi) == model
    leaf = eng.store.path(eng.get(vdi).volume)
    assert lv.read(leaf, 0, SIZE) == model
    tapdisk(20000, 8, "F")                  # tapdisk keeps writing the collected image
    all_sound(eng)
    assert disk(eng, vdi) == model
