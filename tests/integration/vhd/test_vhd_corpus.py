"""The library against the images blktap itself makes (tests/data/vhd-corpus).

Five images made by blktap's vhd-util and written through libvhd's
vhd_io_write (tapdisk's write path), with a manifest of every write.  Every
``vhd`` operation on them must keep every byte blktap wrote (compared with
the manifest's model of the writes and its SHA-256 of each disk), and leave
images that ``check`` (libvhd's rules) accepts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import libvhd_style as lv
import pytest
import vhdcorpus as vc
import vhdproof as vp
from smcommon import vhd

pytestmark = pytest.mark.integration

SIZE = 64 * 1024 * 1024


def disk(path: Path) -> bytes:
    return vhd.read(str(path), 0, vhd.info(str(path)).virtual_size)


def test_set_parent_keeps_the_childs_own_sectors(corpus: Path) -> None:
    """The issue's reproduction: libvhd stores a locator's data_space in bytes
    (512); read as sectors, set_parent zeroed 256 KiB after each locator, where
    libvhd put the child's first data block (its sectors 4-11 then read the
    parent's data)."""
    shutil.copyfile(corpus / "base.vhd", corpus / "base-copy.vhd")
    vhd.set_parent(str(corpus / "child.vhd"), str(corpus / "base-copy.vhd"))
    assert Path(vhd.info(str(corpus / "child.vhd")).parent or "").name == "base-copy.vhd"
    got = disk(corpus / "child.vhd")
    want = vc.model("child.vhd")
    assert got[4 * 512 : 12 * 512] == want[4 * 512 : 12 * 512]
    assert vc.sha256(got) == vc.entry("child.vhd")["raw_sha256"]
    assert vhd.check(str(corpus / "child.vhd")) == []
    assert vc.sha256(disk(corpus / "grandchild.vhd")) == vc.entry("grandchild.vhd")["raw_sha256"]


# --- helpers ------------------------------------------------------------------


def sectors(first: int, count: int, tag: str) -> bytes:
    return b"".join(vc.sector_data(tag, s) for s in range(first, first + count))


def sound(path: Path) -> None:
    """Both libvhd-rules checkers accept the image (and its chain)."""
    assert vhd.check(str(path)) == [], f"{path.name}: {vhd.check(str(path))}"
    assert lv.problems(path) == [], f"{path.name}: {lv.problems(path)}"


def cli(*args: str) -> str:
    res = vp.run_vhd(*args)
    assert res.returncode == 0, f"vhd {' '.join(args)}: {res.stderr}"
    return res.stdout


def written_sectors(name: str) -> set[int]:
    out: set[int] = set()
    for image in vc.chain(name):
        for first, count, _tag in vc.writes(image):
            out.update(range(first, first + count))
    return out


# --- the images as blktap left them ------------------------------------------------


@pytest.mark.parametrize("name", vc.NAMES)
def test_corpus_image_is_sound_and_reads_as_blktap_wrote_it(corpus: Path, name: str) -> None:
    """check passes on every corpus image unchanged; every read-only command
    shows what blktap wrote (the manifest's hashes and model), changing nothing."""
    path = corpus / name
    before = {p.name: p.read_bytes() for p in corpus.iterdir()}
    entry = vc.entry(name)
    sound(path)
    assert cli("check", str(path)).strip().endswith("ok")
    info = json.loads(cli("info", "--json", str(path)))
    assert info["virtual_size"] == entry["virtual_size"]
    assert info["physical_size"] == entry["physical_size"]
    assert info["hidden"] is entry["hidden"]
    assert (Path(info["parent"]).name if info["parent"] else None) == entry["parent"]
    assert [Path(p).name for p in json.loads(cli("chain", "--json", str(path)))["chain"]] == \
        vc.chain(name)
    cli("read", str(path), "-o", str(corpus.parent / "read.raw"))
    assert vc.sha256((corpus.parent / "read.raw").read_bytes()) == entry["raw_sha256"]
    cli("export", str(path), str(corpus.parent / "export.raw"))
    raw = (corpus.parent / "export.raw").read_bytes()
    assert vc.sha256(raw) == entry["raw_sha256"] and raw == vc.model(name)
    extents = json.loads(cli("map", "--json", str(path)))
    mapped = {s for e in extents if e["depth"]
              for s in range(e["offset"] // 512, (e["offset"] + e["length"]) // 512)}
    assert mapped == written_sectors(name)
    assert cli("repair", str(path)).strip().endswith("nothing to repair")
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == before


@pytest.mark.parametrize("name", vc.NAMES)
def test_convert_and_import_make_images_like_blktaps(corpus: Path, tmp_path: Path,
                                                     name: str) -> None:
    flat, imported = tmp_path / "flat.vhd", tmp_path / "imported.vhd"
    cli("convert", str(corpus / name), str(flat))
    cli("export", str(corpus / name), str(tmp_path / "disk.raw"))
    cli("import", str(tmp_path / "disk.raw"), str(imported))
    for made in (flat, imported):
        sound(made)
        assert vc.sha256(disk(made)) == vc.entry(name)["raw_sha256"]
        assert lv.read(made, 0, SIZE) == vc.model(name)        # libvhd reads it alike
        facts = lv.facts(made)
        assert all(facts[k] for k in ("batmap_header_at_bat_end", "map_after_header",
                                      "data_4k_aligned", "blocks_after_metadata",
                                      "footer_copy_equal")), facts
        assert facts["batmap_version"] == 0x00010002


@pytest.mark.parametrize("name", vc.NAMES)
def test_snapshot_of_a_blktap_image_then_tapdisk_writes_it(corpus: Path, name: str) -> None:
    leaf = corpus / "leaf.vhd"
    cli("snapshot", str(corpus / name), str(leaf))
    sound(leaf)
    model = vc.model(name)
    assert disk(leaf) == model
    # tapdisk (libvhd) writes into our snapshot: partial block, whole block, a new block
    for first, count, tag in [(3, 5, "S"), (4096 * 5, 4096, "T"), (4096 * 9 + 100, 8, "U")]:
        data = sectors(first, count, tag)
        lv.write(leaf, first * 512, data)
        model[first * 512 : first * 512 + len(data)] = data
    sound(leaf)
    assert disk(leaf) == model and lv.read(leaf, 0, SIZE) == model
    assert vc.sha256(disk(corpus / name)) == vc.entry(name)["raw_sha256"]


@pytest.mark.parametrize("name", vc.NAMES)
def test_our_writes_into_blktap_images(corpus: Path, name: str) -> None:
    path = corpus / name
    model = vc.model(name)
    writes = [(5, b"unaligned"), (4096 * 512 - 3, b"across a block boundary"),
              (2 * 1024 * 1024 * 6, b"F" * 2 * 1024 * 1024), (5000 * 512, b"over B and E")]
    for off, data in writes:
        src = corpus.parent / "in.bin"
        src.write_bytes(data)
        cli("write", str(path), "--offset", str(off), "--input", str(src))
        model[off : off + len(data)] = data
    sound(path)
    assert disk(path) == model
    assert lv.read(path, 0, SIZE) == model                      # libvhd reads our writes
    assert lv.load(path).bmap[0] & 0x02                        # block 6 is full: its bit


@pytest.mark.parametrize("name", vc.NAMES)
def test_set_hidden_on_blktap_images(corpus: Path, name: str) -> None:
    path = corpus / name
    cli("set-hidden", str(path), "false" if vc.entry(name)["hidden"] else "true")
    assert vhd.info(str(path)).hidden is not vc.entry(name)["hidden"]
    sound(path)
    assert vc.sha256(disk(path)) == vc.entry(name)["raw_sha256"]


def test_set_parent_twice_reuses_the_freed_space(corpus: Path) -> None:
    """Re-linking writes the new locators beside the old ones and switches the
    header; the next re-link can use the space the first one freed."""
    for i in range(4):
        copy = corpus / f"child-copy-{i}.vhd"
        shutil.copyfile(corpus / "child.vhd", copy)
        cli("set-parent", str(corpus / "grandchild.vhd"), str(copy))
        sound(corpus / "grandchild.vhd")
        assert vc.sha256(disk(corpus / "grandchild.vhd")) == vc.entry("grandchild.vhd")["raw_sha256"]
        assert lv.read(corpus / "grandchild.vhd", 0, SIZE) == vc.model("grandchild.vhd")
    # the data blocks never moved: the alignment gap after libvhd's locators held them
    assert (corpus / "grandchild.vhd").stat().st_size == vc.entry("grandchild.vhd")["physical_size"]


def test_coalesce_and_relink_the_blktap_chain(corpus: Path) -> None:
    """What the GC does: coalesce grandchild into child, then child into base,
    re-linking grandchild to base."""
    cli("coalesce", str(corpus / "grandchild.vhd"))
    sound(corpus / "child.vhd")
    assert disk(corpus / "child.vhd") == vc.model("grandchild.vhd")
    shutil.copyfile(corpus / "child.vhd", corpus / "merged.vhd")
    cli("coalesce", str(corpus / "child.vhd"))
    sound(corpus / "base.vhd")
    assert disk(corpus / "base.vhd") == vc.model("grandchild.vhd")
    cli("set-parent", str(corpus / "grandchild.vhd"), str(corpus / "base.vhd"))
    (corpus / "child.vhd").unlink()
    sound(corpus / "grandchild.vhd")
    assert disk(corpus / "grandchild.vhd") == vc.model("grandchild.vhd")
    assert lv.read(corpus / "grandchild.vhd", 0, SIZE) == vc.model("grandchild.vhd")
    # base is dynamic: its block 0 (written whole) and every block new to it (7 from
    # child, 10 from grandchild) are whole, so their bits are set
    assert lv.load(corpus / "base.vhd").bmap[:2] == b"\x81\x20"


@pytest.mark.slow
@pytest.mark.parametrize("name", vc.NAMES)
@pytest.mark.parametrize("grown", [300 * 1024 * 1024, 2048 * 1024 * 1024 + 2 * 1024 * 1024])
def test_resize_of_blktap_images(corpus: Path, name: str, grown: int) -> None:
    """Growing needs a longer BAT (except prealloc's 2 GiB): the batmap header
    moves to its new end, libvhd's locators after it move out of the way."""
    path = corpus / name
    cli("resize", str(path), str(grown))
    sound(path)
    model = vc.model(name)
    assert vhd.read(str(path), 0, SIZE) == model
    assert vhd.read(str(path), grown - 4 * 1024 * 1024, 4 * 1024 * 1024) == bytes(4 * 1024 * 1024)
    assert lv.read(path, 0, SIZE) == model
    tail = sectors(grown // 512 - 8, 8, "Z")
    lv.write(path, grown - 4096, tail)                          # tapdisk writes the new end
    vhd.write(str(path), grown - 2 * 1024 * 1024 - 4096, b"ours")
    sound(path)
    assert vhd.read(str(path), grown - 4096, 4096) == tail
    assert vc.sha256(vhd.read(str(path), 0, SIZE)) == vc.entry(name)["raw_sha256"]


def test_every_image_we_make_has_blktaps_structure(corpus: Path, tmp_path: Path) -> None:
    """The images every operation of ours produces carry what blktap's show:
    the batmap header at the end of the BAT (version 1.2), the map right after
    it, 4 KiB-aligned data, blocks after the metadata, locator spaces libvhd
    reads, equal footer copies."""
    d = tmp_path
    made = {
        "create": d / "create.vhd", "create-max-size": d / "max.vhd",
        "snapshot": d / "snap.vhd", "import": d / "import.vhd", "convert": d / "convert.vhd",
    }
    vhd.create(str(made["create"]), 10 * 1024 * 1024)
    vhd.create(str(made["create-max-size"]), 10 * 1024 * 1024, max_size=3 * 1024**3)
    vhd.snapshot(str(corpus / "grandchild.vhd"), str(made["snapshot"]),
                 search_dirs=[str(corpus), str(d)])
    vhd.export_raw(str(corpus / "grandchild.vhd"), str(d / "g.raw"))
    vhd.import_raw(str(d / "g.raw"), str(made["import"]))
    vhd.convert(str(corpus / "child.vhd"), str(made["convert"]))
    for path in list(made.values())[:2]:                    # written, grown, shrunk
        vhd.write(str(path), 3 * 1024 * 1024 + 5, vc.sector_data("W", 1) * 9)
        vhd.resize(str(path), 1300 * 1024 * 1024)
        vhd.write(str(path), 1299 * 1024 * 1024, b"end")
    for what, path in made.items():
        facts = lv.facts(path)
        assert facts == {**facts, "batmap_header_at_bat_end": True, "batmap_version": 0x00010002,
                         "map_after_header": True, "data_4k_aligned": True,
                         "blocks_after_metadata": True, "locator_spaces_valid": True,
                         "footer_copy_equal": True}, (what, facts)
        assert vhd.check(str(path), search_dirs=[str(corpus), str(d)]) == [], what
    assert lv.problems(made["import"]) == [] and lv.problems(made["convert"]) == []
