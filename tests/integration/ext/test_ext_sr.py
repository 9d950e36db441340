"""SR.* through the real plugins: create, attach, detach, destroy, reset, ls,
scan; ext on a directory (``path``) and, as root, on ext4 on a loop device;
nfs on the session's NFS server (v3 and v4.1)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from ext_helpers import SR, Ext, SrFactory

pytestmark = pytest.mark.integration


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def test_sr_lifecycle(ext: Ext, make_sr: SrFactory, sr_kind: str) -> None:
    assert ext.ok("SR.ls") == []
    sr = make_sr.make(sr_kind, attach=False)
    config = sr.config
    # created but not attached: VDI calls need an attached SR
    assert sr.uuid not in ext.ok("SR.ls")
    assert sr.err("SR.scan") == ["Sr_not_attached", sr.uuid]
    assert sr.err(
        "VDI.create", vdi_info={"name_label": "x", "virtual_size": "1048576"}
    ) == [
        "Sr_not_attached",
        sr.uuid,
    ]
    assert sr.err("SR.detach") == ["Sr_not_attached", sr.uuid]
    assert sr.err("SR.destroy") == ["Sr_not_attached", sr.uuid]

    sr.ok("SR.attach", device_config=config)
    assert ext.ok("SR.ls") == [sr.uuid]
    if sr.mounted:
        assert _mounted(sr.data_dir), f"{sr.data_dir} is not mounted"
    # attaching again is harmless
    sr.ok("SR.attach", device_config=config)
    assert ext.ok("SR.ls") == [sr.uuid]
    # SR.create of an attached SR
    assert sr.err("SR.create", device_config=config, physical_size="0") == [
        "Sr_attached",
        sr.uuid,
    ]
    assert sr.scan() == {}
    v = sr.create("d1")
    assert set(sr.scan()) == {v["vdi"]}

    sr.ok("SR.detach")
    assert ext.ok("SR.ls") == []
    if sr.mounted:
        assert not _mounted(sr.data_dir)
    assert sr.err("VDI.stat", vdi=v["vdi"]) == ["Sr_not_attached", sr.uuid]
    # the data outlives a detach
    sr.ok("SR.attach", device_config=config)
    assert set(sr.scan()) == {v["vdi"]}
    assert sr.ok("VDI.stat", vdi=v["vdi"])["name_label"] == "d1"

    sr.ok("SR.destroy")
    assert ext.ok("SR.ls") == []
    assert sr.err("SR.scan") == ["Sr_not_attached", sr.uuid]
    # destroyed: it can be neither attached nor probed again
    r = ext.call("SR.attach", sr=sr.uuid, device_config=config)
    assert not r.ok, r.describe()
    assert ext.ok("SR.ls") == []
    if sr.kind == "path":
        left = [p for p in Path(config["path"]).rglob("*") if p.is_file()]
        assert not left, f"SR.destroy left {left}"
    if sr.kind.startswith("nfs"):  # <serverpath>/<sr> is gone, seen over NFS
        assert sr.uuid not in ext.backend.nfs_ls("/export")
        assert sr.backing is not None and not sr.backing.exists()


def test_two_srs_are_independent(ext: Ext, make_sr: SrFactory) -> None:
    a = make_sr.make()
    b = make_sr.make()
    assert sorted(ext.ok("SR.ls")) == sorted([a.uuid, b.uuid])
    va = a.create("in-a")
    assert b.scan() == {}
    assert b.err("VDI.stat", vdi=va["vdi"]) == ["Vdi_does_not_exist", va["vdi"]]
    b.ok("SR.detach")
    assert ext.ok("SR.ls") == [a.uuid]
    assert set(a.scan()) == {va["vdi"]}


@pytest.mark.sr_types("ext")  # nfs: tests/integration/nfs/test_nfs_errors.py
def test_sr_create_errors(ext: Ext, tmp_path: Path) -> None:
    sr = str(uuid.uuid4())
    # no device_config key at all
    err = ext.err("SR.create", sr=sr, device_config={}, physical_size="0")
    assert err[0] == "Backend_error" and any(
        "device" in e or "path" in e for e in err
    ), err
    # a path that is not a directory
    (tmp_path / "nope").write_text("a file")
    err = ext.err(
        "SR.create",
        sr=sr,
        device_config={"path": str(tmp_path / "nope")},
        physical_size="0",
    )
    assert err[:2] == ["Backend_error", "PATH_NOT_FOUND"] and any("nope" in e for e in err), err
    # a directory that cannot be made (its parent is a file)
    err = ext.err(
        "SR.create",
        sr=sr,
        device_config={"path": str(tmp_path / "nope" / "sr")},
        physical_size="0",
    )
    assert err[:2] == ["Backend_error", "PATH_NOT_CREATED"], err
    # a device that is not a block device
    (tmp_path / "plain").write_bytes(b"\0" * 4096)
    err = ext.err(
        "SR.create",
        sr=sr,
        device_config={"device": str(tmp_path / "plain")},
        physical_size="0",
    )
    assert err[0] == "Backend_error", err
    assert ext.ok("SR.ls") == []
    # attach of an SR never created
    r = ext.call(
        "SR.attach", sr=str(uuid.uuid4()), device_config={"path": str(tmp_path)}
    )
    assert not r.ok, r.describe()


@pytest.mark.sr_types("ext")  # nfs: tests/integration/nfs/test_nfs_sr.py
def test_sr_create_refuses_a_directory_holding_another_sr(
    ext: Ext, make_sr: SrFactory, tmp_path: Path
) -> None:
    a = make_sr.make()
    v = a.create("precious")
    other = str(uuid.uuid4())
    err = ext.err("SR.create", sr=other, device_config=a.config, physical_size="0")
    assert err[0] == "Backend_error", err
    r = ext.call("SR.attach", sr=other, device_config=a.config)
    assert not r.ok, r.describe()
    # an SR on the parent directory: its destroy removes its own data only
    (tmp_path / "user-file").write_text("mine")
    ext.ok(
        "SR.create", sr=other, device_config={"path": str(tmp_path)}, physical_size="0"
    )
    ext.ok("SR.attach", sr=other, device_config={"path": str(tmp_path)})
    assert ext.ok("SR.scan", sr=other) == []
    ext.ok("SR.destroy", sr=other)
    assert (tmp_path / "user-file").read_text() == "mine"
    assert a.ok("VDI.stat", vdi=v["vdi"])["name_label"] == "precious"
    assert a.read(v["vdi"], [(0, 512)]) == [b"\0" * 512]


def test_sr_detach_deactivates_and_detaches_datapaths(each_sr: SR) -> None:
    sr = each_sr
    a = sr.create("a")
    b = sr.create("b")
    sr.attach(a["vdi"], "vm1", True)
    sr.ok("VDI.activate", dp="vm1", vdi=a["vdi"])
    sr.attach(b["vdi"], "vm1", False)
    sr.ok("SR.detach")
    sr.ok("SR.attach", device_config=sr.config)
    # had the datapaths survived, this activate would be a no-op or legal;
    # after a detach they are Detached, so activate is illegal
    err = sr.err("VDI.activate", dp="vm1", vdi=a["vdi"])
    assert err[0] == "Illegal_transition" and err[1] == "Detached", err
    err = sr.err("VDI.activate", dp="vm1", vdi=b["vdi"])
    assert err[0] == "Illegal_transition" and err[1] == "Detached", err
    # and the VDIs are free again: destroy works
    sr.ok("VDI.destroy", vdi=a["vdi"])
    sr.ok("VDI.destroy", vdi=b["vdi"])


def test_sr_destroy_with_active_datapaths(ext: Ext, each_sr: SR) -> None:
    sr = each_sr
    a = sr.create("a")
    sr.snapshot(a["vdi"])
    sr.attach(a["vdi"], "vm1", True)
    sr.ok("VDI.activate", dp="vm1", vdi=a["vdi"])
    sr.ok("SR.destroy")
    assert ext.ok("SR.ls") == []
    r = ext.call("SR.attach", sr=sr.uuid, device_config=sr.config)
    assert not r.ok, r.describe()


def test_sr_reset_forgets_host_state(ext: Ext, each_sr: SR) -> None:
    sr = each_sr
    a = sr.create("a")
    sr.attach(a["vdi"], "vm1", True)
    sr.ok("VDI.activate", dp="vm1", vdi=a["vdi"])
    sr.ok("SR.reset")
    assert sr.uuid not in ext.ok("SR.ls")
    if sr.mounted:
        # the mount is host state too; clean it so the re-attach below mounts
        subprocess.run(["umount", str(sr.data_dir)], capture_output=True, check=False)
    sr.ok("SR.attach", device_config=sr.config)
    # the VDI survived (the backend keeps the data) ...
    assert set(sr.scan()) == {a["vdi"]}
    # ... and the datapath was forgotten: a fresh attach RO is allowed
    # (it would be refused as RO over RW had the state survived)
    sr.attach(a["vdi"], "vm1", False)
    sr.ok("VDI.detach", dp="vm1", vdi=a["vdi"])
    sr.ok("VDI.destroy", vdi=a["vdi"])


def test_sr_scan_hides_parents_and_lists_every_visible_vdi(sr: SR) -> None:
    a = sr.create("a")
    s1 = sr.snapshot(a["vdi"])
    c1 = sr.clone(a["vdi"])
    s2 = sr.snapshot(s1["vdi"])
    b = sr.create("b")
    scan = sr.assert_consistent()
    assert set(scan) == {a["vdi"], s1["vdi"], c1["vdi"], s2["vdi"], b["vdi"]}
    # the hidden parents exist on disk but SR.scan never shows them
    files = sr.vhd_files()
    assert sum(1 for i in files.values() if i.hidden) >= 2
    assert len(files) > len(scan)
