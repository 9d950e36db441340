"""The generic Driver over a ``path`` SR (ext_driver.ExtType): SR lifecycle,
registry, errors, datapaths, copy, diagnostics; and that EXTSR's driver module
stays light (Query.query imports no engine)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from engine_helpers import K4, MiB, pat
from smcommon.engine.driver import Driver, url_kind
from smcommon.errors import (
    BackendError,
    IllegalTransition,
    InvalidRequest,
    SrAttached,
    SrNotAttached,
    VdiDoesNotExist,
)
from smcommon.paths import Paths

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "plugins" / "ext"))
import ext_driver

D = "unit"


@pytest.fixture
def drv(paths: Paths) -> Driver:
    return Driver(paths, ext_driver.ExtType(paths))


def make(
    drv: Driver, tmp_path: Path, attach: bool = True
) -> tuple[str, dict[str, str]]:
    sr = str(uuid.uuid4())
    d = tmp_path / f"dir-{sr[:8]}"
    d.mkdir()
    cfg = {"path": str(d)}
    drv.sr_create(D, sr, cfg, 0)
    if attach:
        drv.sr_attach(D, sr, cfg)
    return sr, cfg


def vinfo(name: str, size: int = 4 * MiB) -> dict[str, object]:
    return {"name_label": name, "virtual_size": size}


def test_sr_lifecycle(drv: Driver, tmp_path: Path) -> None:
    assert drv.sr_ls(D) == []
    sr, cfg = make(drv, tmp_path, attach=False)
    with pytest.raises(SrNotAttached):
        drv.sr_scan(D, sr)
    with pytest.raises(SrNotAttached):
        drv.sr_detach(D, sr)
    with pytest.raises(SrNotAttached):
        drv.sr_destroy(D, sr)
    drv.sr_attach(D, sr, cfg)
    drv.sr_attach(D, sr, cfg)  # again: harmless
    assert drv.sr_ls(D) == [sr]
    with pytest.raises(SrAttached):
        drv.sr_create(D, sr, cfg, 0)
    v = drv.vdi_create(D, sr, vinfo("d1"))["vdi"]
    drv.sr_detach(D, sr)
    assert drv.sr_ls(D) == []
    with pytest.raises(SrNotAttached):
        drv.vdi_stat(D, sr, v)
    drv.sr_attach(D, sr, cfg)
    assert [i["vdi"] for i in drv.sr_scan(D, sr)] == [v]
    drv.sr_destroy(D, sr)
    assert drv.sr_ls(D) == []
    assert [p for p in Path(cfg["path"]).rglob("*") if p.is_file()] == []
    with pytest.raises(BackendError, match="SR_NOT_FOUND"):
        drv.sr_attach(D, sr, cfg)


def test_sr_create_errors(drv: Driver, tmp_path: Path) -> None:
    sr = str(uuid.uuid4())
    with pytest.raises(BackendError, match="DEVICE_CONFIG_INVALID"):
        drv.sr_create(D, sr, {}, 0)
    with pytest.raises(BackendError, match="DEVICE_CONFIG_INVALID"):
        drv.sr_create(D, sr, {"path": "relative/dir"}, 0)
    # a missing directory is made (with its parents); a file is refused
    made = tmp_path / "made" / "sr"
    drv.sr_create(D, str(uuid.uuid4()), {"path": str(made)}, 0)
    assert made.is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BackendError, match="PATH_NOT_FOUND"):
        drv.sr_create(D, sr, {"path": str(tmp_path / "afile")}, 0)
    with pytest.raises(BackendError, match="nope is not an existing directory .*mistyped"):
        drv.sr_attach(D, sr, {"path": str(tmp_path / "nope")})
    (tmp_path / "plain").write_bytes(b"\0" * 4096)
    with pytest.raises(BackendError, match="NOT_A_BLOCK_DEVICE"):
        drv.sr_create(D, sr, {"device": str(tmp_path / "plain")}, 0)
    # a directory holding another SR is refused
    _other, cfg = make(drv, tmp_path)
    with pytest.raises(BackendError, match="SR_EXISTS"):
        drv.sr_create(D, sr, cfg, 0)
    with pytest.raises(BackendError, match="SR_UUID_MISMATCH"):
        drv.sr_attach(D, sr, cfg)
    # a directory holding VHD files of nobody's is refused (SR.destroy would
    # remove them), and the files stay
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.vhd").write_bytes(b"user data")
    with pytest.raises(BackendError, match="SR_DIR_HOLDS_IMAGES.*keep.vhd"):
        drv.sr_create(D, sr, {"path": str(mine)}, 0)
    assert (mine / "keep.vhd").read_bytes() == b"user data"
    with pytest.raises(InvalidRequest):
        drv.sr_scan(D, "../etc")


def test_detach_releases_datapaths(drv: Driver, tmp_path: Path) -> None:
    sr, cfg = make(drv, tmp_path)
    a = drv.vdi_create(D, sr, vinfo("a"))["vdi"]
    info = drv.vdi_attach(D, "vm1", sr, a, True)
    assert Path(info["params"]).is_file()
    assert info["xenstore_data"]["vdi-uuid"] == a
    drv.vdi_activate(D, "vm1", sr, a)
    drv.sr_detach(D, sr)
    drv.sr_attach(D, sr, cfg)
    with pytest.raises(IllegalTransition):
        drv.vdi_activate(D, "vm1", sr, a)
    drv.vdi_destroy(D, sr, a)


def test_reset_forgets_datapaths(drv: Driver, tmp_path: Path) -> None:
    sr, cfg = make(drv, tmp_path)
    a = drv.vdi_create(D, sr, vinfo("a"))["vdi"]
    drv.vdi_attach(D, "vm1", sr, a, True)
    drv.sr_reset(D, sr)
    assert drv.sr_ls(D) == []
    drv.sr_attach(D, sr, cfg)
    drv.vdi_attach(D, "vm1", sr, a, False)  # RO: the RW state was forgotten
    drv.vdi_detach(D, "vm1", sr, a)


def test_read_only_vdi_cannot_attach_rw(drv: Driver, tmp_path: Path) -> None:
    sr, _ = make(drv, tmp_path)
    v = drv.vdi_create(D, sr, {**vinfo("ro"), "read_only": True})["vdi"]
    with pytest.raises(BackendError, match="VDI_READ_ONLY"):
        drv.vdi_attach(D, "vm", sr, v, True)
    assert drv.vdi_attach(D, "vm", sr, v, False)["xenstore_data"]["mode"] == "r"


def test_copy_between_srs(drv: Driver, tmp_path: Path) -> None:
    from smcommon import vhd

    a, _ = make(drv, tmp_path)
    b, _ = make(drv, tmp_path)
    v = drv.vdi_create(D, a, {**vinfo("src"), "name_description": "copied"})["vdi"]
    path = drv.vdi_attach(D, "w", a, v, True)["params"]
    vhd.write(path, 0, pat("c0"))
    drv.vdi_detach(D, "w", a, v)
    drv.vdi_snapshot(D, a, {"vdi": v})
    new = drv.vdi_copy(D, a, v, "", b)
    st = drv.vdi_stat(D, b, new)
    assert st["name_description"] == "copied"
    assert st["virtual_size"] == drv.vdi_stat(D, a, v)["virtual_size"]
    npath = drv.vdi_attach(D, "r", b, new, False)["params"]
    assert vhd.read(npath, 0, K4) == pat("c0")
    assert vhd.chain(npath) == [npath]
    # a URL of this machine whose dest is not attached here: another
    # dispatcher, which must be a peer of this host's pool.json (there is none)
    with pytest.raises(BackendError, match="REMOTE_NOT_A_PEER"):
        drv.vdi_copy(D, a, v, "https://127.0.0.1:9/", str(uuid.uuid4()))
    with pytest.raises(VdiDoesNotExist):
        drv.vdi_copy(D, a, str(uuid.uuid4()), "", b)
    with pytest.raises(SrNotAttached):
        drv.vdi_copy(D, a, v, "", str(uuid.uuid4()))


def test_url_kind() -> None:
    for local in ("", "local", "file:///x"):
        assert url_kind(local) == "local"
    for here in ("http://localhost:80/", "http://127.0.0.1/"):
        assert url_kind(here) == "here"
    assert url_kind("http://192.0.2.1/") == "remote"


def test_gc_method_and_diagnostics(drv: Driver, tmp_path: Path) -> None:
    sr, _ = make(drv, tmp_path)
    v = drv.vdi_create(D, sr, vinfo("a"))["vdi"]
    s = drv.vdi_snapshot(D, sr, {"vdi": v})["vdi"]
    drv.vdi_attach(D, "vm", sr, v, True)
    text = drv.query_diagnostics(D)
    assert sr in text and v in text and "hidden" in text and "vm=Attached(RW)" in text
    drv.vdi_detach(D, "vm", sr, v)
    drv.vdi_destroy(D, sr, s)
    assert "deleted" in drv.sr_gc(D, sr)
    assert "gc last run" in drv.query_diagnostics(D)
    assert [m.name for m in drv.extra_methods] == ["SR.gc", "SR.stat", "VDI.import_raw"]


def test_query_without_the_engine(paths: Paths) -> None:
    plugin = ext_driver.factory(paths)
    q = plugin.query_query(D)
    assert q["driver"] == "ext" and set(q["configuration"]) == {"device", "path", "force"}
    code = (
        "import sys; sys.path.insert(0, {!r}); import ext_driver; "
        "ext_driver.factory(None).query_query('x'); "
        "light = {{'smcommon.engine', 'smcommon.engine.front'}}; "
        "assert not [m for m in sys.modules if m not in light and "
        "(m.startswith('smcommon.engine') or m.startswith('smcommon.vhd'))], sorted(sys.modules)"
    ).format(str(REPO / "plugins" / "ext"))
    subprocess.run([sys.executable, "-c", code], check=True)
    assert callable(plugin.vdi_create)  # the rest comes from the engine's Driver


def test_a_call_that_waited_for_a_detach_sees_the_sr_gone(
    drv: Driver, tmp_path: Path
) -> None:
    from smcommon.engine import vdipath

    sr, _ = make(drv, tmp_path)
    v = drv.vdi_create(D, sr, vinfo("a"))["vdi"]
    eng = drv.engine(sr)  # looked up before the detach, as a waiting call would
    drv.sr_detach(D, sr)
    with pytest.raises(SrNotAttached):
        eng.create(vinfo("late"))
    with pytest.raises(SrNotAttached):
        vdipath.attach(eng, "vm", v, True)
