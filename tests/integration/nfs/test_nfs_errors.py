"""NFSSR's errors against a real server (nfs-ganesha in a network namespace):
bad device_config, a dead host, a closed port, a missing export, a refused
mount, a missing SR directory, a busy mount, the development mode switched
off.  Each answer names what is wrong (server, port, path, or the key).

On this machine the mounts are the development mount (the kernel has no NFS
client): the probe (rpcinfo), the export list (showmount) and the listing of
the path (nfs-ls) talk NFS to the server for real; only the last step, the
mount, is a bind mount of the exported directory."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from ext_helpers import Ext, SrFactory

pytestmark = [pytest.mark.integration, pytest.mark.root]


def create(nfs: Ext, **config: str) -> list[str]:
    return nfs.err("SR.create", sr=str(uuid.uuid4()), device_config=config, physical_size="0")


def cfg(nfs: Ext, **over: str) -> dict[str, str]:
    return {"server": nfs.backend.address, "serverpath": "/export", **over}


def test_query_lists_every_key(nfs: Ext) -> None:
    conf = nfs.ok("Query.query")["configuration"]
    assert set(conf) == {"server", "serverpath", "nfsversion", "port", "options"}
    assert all(isinstance(v, str) and len(v) > 10 for v in conf.values()), conf


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"server": ""}, "server"),
        ({"serverpath": ""}, "serverpath"),
        ({"server": "-oremount"}, "server"),
        ({"server": "a b"}, "server"),
        ({"serverpath": "export"}, "serverpath"),
        ({"serverpath": "/export/../etc"}, "serverpath"),
        ({"serverpath": "/export\nx"}, "serverpath"),
        ({"nfsversion": "2"}, "nfsversion"),
        ({"nfsversion": "4.3"}, "nfsversion"),
        ({"port": "0"}, "port"),
        ({"port": "65536"}, "port"),
        ({"port": "20x"}, "port"),
        ({"options": "hard"}, "options"),
        ({"options": "nolock"}, "options"),
        ({"options": "noatime,bogus"}, "options"),
        ({"options": "timeo=0"}, "options"),
    ],
)
def test_bad_device_config_names_the_key(nfs: Ext, over: dict[str, str], key: str) -> None:
    config = cfg(nfs, **over)
    config = {k: v for k, v in config.items() if v != ""}
    err = create(nfs, **config)
    assert err[:2] == ["Backend_error", "DEVICE_CONFIG_INVALID"], err
    assert err[2].startswith(f"{key}: "), err
    assert nfs.ok("SR.ls") == []


def test_dead_host(nfs: Ext) -> None:
    """An address of the server's subnet that no host has: ARP goes
    unanswered, as for a powered-off filer."""
    dead = nfs.backend.dead_address
    for version in ("3", "4.1"):
        err = create(nfs, **cfg(nfs, server=dead, nfsversion=version))
        assert err[:2] == ["Backend_error", "NFS_SERVER_UNREACHABLE"], err
        text = " ".join(err)
        assert dead in text and "port" in text, text
        assert "no route to host" in text or "no answer" in text, text


def test_closed_port(nfs: Ext) -> None:
    for version in ("3", "4.1"):
        err = create(nfs, **cfg(nfs, port="2050", nfsversion=version))
        assert err[:2] == ["Backend_error", "NFS_SERVER_UNREACHABLE"], err
        assert "port 2050" in err[2] and "connection refused" in err[2], err
        assert nfs.backend.address in err[2]


def test_missing_export(nfs: Ext) -> None:
    for version in ("3", "4.1"):
        err = create(nfs, **cfg(nfs, serverpath="/nope", nfsversion=version))
        assert err[:2] == ["Backend_error", "NFS_EXPORT_MISSING"], err
        assert "/nope" in err[2] and nfs.backend.address in err[2], err


def test_refused_mount(nfs: Ext) -> None:
    """/denied is exported to this host, but only for Kerberos: the server
    refuses an AUTH_SYS mount."""
    for version in ("3", "4.1"):
        err = create(nfs, **cfg(nfs, serverpath="/denied", nfsversion=version))
        assert err[:2] == ["Backend_error", "NFS_MOUNT_REFUSED"], err
        assert "/denied" in err[2] and nfs.backend.address in err[2], err


def test_attach_of_a_missing_sr_directory(nfs: Ext, factory: SrFactory) -> None:
    sr = factory.make(attach=False)
    assert sr.backing is not None
    os.rename(sr.backing, sr.backing.with_name("moved-" + sr.uuid))
    try:
        err = sr.err("SR.attach", device_config=sr.config)
        assert err[:2] == ["Backend_error", "SR_DIR_MISSING"], err
        assert f"/export/{sr.uuid}" in err[2] and "does not exist" in err[2], err
        assert nfs.ok("SR.ls") == []
    finally:
        os.rename(sr.backing.with_name("moved-" + sr.uuid), sr.backing)
    sr.ok("SR.attach", device_config=sr.config)
    assert nfs.ok("SR.ls") == [sr.uuid]


def test_create_refuses_a_serverpath_that_is_an_sr(nfs: Ext, factory: SrFactory) -> None:
    a = factory.make()
    v = a.create("precious")
    err = create(nfs, **cfg(nfs, serverpath=f"/export/{a.uuid}"))
    assert err[:2] == ["Backend_error", "SR_EXISTS"], err
    assert a.uuid in err[2], err
    # the same SR again: refused, and the first one is untouched
    err = nfs.err("SR.create", sr=a.uuid, device_config=a.config, physical_size="0")
    assert err[0] == "Sr_attached", err
    a.ok("SR.detach")
    err = nfs.err("SR.create", sr=a.uuid, device_config=a.config, physical_size="0")
    assert err[:2] == ["Backend_error", "SR_EXISTS"], err
    a.ok("SR.attach", device_config=a.config)
    assert a.ok("VDI.stat", vdi=v["vdi"])["name_label"] == "precious"


def test_busy_mount_is_reported_never_lazily_detached(nfs: Ext, factory: SrFactory) -> None:
    sr = factory.make()
    v = sr.create("d")
    with open(sr.data_dir / "held-open", "w"):  # a user of the mount
        err = sr.err("SR.detach")
        assert err[:2] == ["Backend_error", "MOUNT_BUSY"], err
        assert str(sr.data_dir) in err[2], err
        # still mounted and attached, and working
        with open("/proc/self/mounts") as f:
            assert any(line.split()[1] == str(sr.data_dir) for line in f)
        assert nfs.ok("SR.ls") == [sr.uuid]
        assert set(sr.scan()) == {v["vdi"]}
    os.unlink(sr.data_dir / "held-open")
    sr.ok("SR.detach")
    assert nfs.ok("SR.ls") == []


def test_development_mode_is_explicit(nfs: Ext, tmp_path: Path) -> None:
    """Without SM_NFS_DEV_MODE=1 (and no NFS client in the kernel) nothing is
    mounted, and the map of exports is refused; Query.diagnostics says which
    mode is in force."""
    config = cfg(nfs)
    off = Ext(nfs.root, plugin=nfs.plugin, env={"SM_NFS_DEV_MODE": "0"})
    err = off.err("SR.create", sr=str(uuid.uuid4()), device_config=config, physical_size="0")
    assert err[:2] == ["Backend_error", "NFS_CLIENT_MISSING"], err
    assert "SM_NFS_DEV_MODE" in " ".join(err)
    assert "mount mode: none" in off.ok("Query.diagnostics")
    # the mode on, the map naming another server: refused, naming the source
    other = tmp_path / "map.json"
    other.write_text(json.dumps({"192.0.2.9:/export": str(tmp_path)}))
    wrong = Ext(nfs.root, plugin=nfs.plugin, env={**nfs.env, "SM_NFS_DEV_EXPORTS": str(other)})
    err = wrong.err("SR.create", sr=str(uuid.uuid4()), device_config=config, physical_size="0")
    assert err[:2] == ["Backend_error", "NFS_DEV_MODE_INVALID"], err
    assert f"{nfs.backend.address}:/export" in err[2], err
    assert "mount mode: dev" in nfs.ok("Query.diagnostics")


def test_files_the_plugin_writes_read_back_over_nfs(nfs: Ext, factory: SrFactory) -> None:
    """What the plugin wrote, read by an NFS client (libnfs-utils) from the
    server: the SR directory, its metadata, the VHD files byte for byte."""
    for kind, version in (("nfs3", "3"), ("nfs4.1", "4")):
        sr = factory.make(kind)
        v = sr.create("d", 4 << 20)
        sr.write(v["vdi"], {0: b"nfs-data" * 512})
        snap = sr.snapshot(v["vdi"])
        server = nfs.backend
        names = server.nfs_ls(f"/export/{sr.uuid}", version)
        local = {p.name: p for p in sr.data_dir.iterdir()}
        assert set(names) == set(local), (names, local)
        vhds = [n for n in names if n.endswith(".vhd")]
        assert len(vhds) == 3  # the VDI's leaf, the snapshot, their hidden base
        for n in vhds:
            data = server.nfs_cat(f"/export/{sr.uuid}/{n}")  # NFSv3 (libnfs's v4 reads large files less well)
            assert data == local[n].read_bytes()
            assert data[-512:][:8] == b"conectix"
        records = server.nfs_ls(f"/export/{sr.uuid}/.sm/vdi", version)
        assert {f"{v['vdi']}.json", f"{snap['vdi']}.json"} == set(records)
        assert sr.read(v["vdi"], [(0, 4096)]) == [b"nfs-data" * 512]
