"""VDI records and their atomic files (pyfakefs: the files are the subject)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem
from smcommon.engine.meta import Metadata, MetadataCorrupt, VdiRecord
from smcommon.errors import VdiDoesNotExist


def test_record_round_trip_and_no_temp_left(fs: FakeFilesystem) -> None:
    m = Metadata(Path("/sr"))
    m.write_sr({"sr": "s"})
    rec = VdiRecord(
        vdi="v1", volume="v1", name_label="n", virtual_size=5, sm_config={"a": "b"}
    )
    m.put(rec)
    assert m.get("v1") == rec
    assert m.names() == ["v1"]
    assert [p.name for p in Path("/sr/.sm/vdi").iterdir()] == ["v1.json"]
    rec.name_label = "n2"
    m.put(rec)
    assert m.get("v1").name_label == "n2"
    assert m.remove("v1") and not m.remove("v1")
    with pytest.raises(VdiDoesNotExist):
        m.get("v1")


def test_unreadable_records_are_reported_not_fatal(fs: FakeFilesystem) -> None:
    m = Metadata(Path("/sr"))
    m.write_sr({"sr": "s"})
    m.put(VdiRecord(vdi="good", volume="good"))
    Path("/sr/.sm/vdi/bad.json").write_text("{torn")
    Path("/sr/.sm/vdi/evil.json").write_text(
        '{"vdi": "evil", "volume": "../../etc/passwd"}'
    )
    Path("/sr/.sm/vdi/trailing.json").write_text('{"vdi": "trailing", "volume": "t"} {}')
    Path("/sr/.sm/vdi/list.json").write_text("[]")
    recs, bad = m.all()
    assert [r.vdi for r in recs] == ["good"]
    assert len(bad) == 4
    assert any("data after the record" in b for b in bad)
    with pytest.raises(MetadataCorrupt):
        m.get("bad")


def test_records_read_as_json_loads_reads_them(fs: FakeFilesystem) -> None:
    """SR.scan's reader (one read per record, relative to the directory)
    takes what json.loads takes: a BOM, space around, a record past 64 KiB."""
    m = Metadata(Path("/sr"))
    m.write_sr({"sr": "s"})
    Path("/sr/.sm/vdi/bom.json").write_bytes(b'\xef\xbb\xbf\n {"vdi": "bom", "volume": "b"}\n\n')
    m.put(VdiRecord(vdi="big", volume="big", name_description="d" * 200_000))
    recs, bad = m.all()
    assert bad == []
    assert [r.vdi for r in recs] == ["big", "bom"]
    assert recs[0] == m.get("big") and len(recs[0].name_description) == 200_000


def test_cleanup_temp(fs: FakeFilesystem) -> None:
    m = Metadata(Path("/sr"))
    m.write_sr({"sr": "s"})
    Path("/sr/.sm/vdi/.x.json.12.tmp").write_text("partial")
    assert m.cleanup_temp() == 1
    assert m.names() == []
