"""Each plugin (EXTSR, NFSSR) as an executable: request forms, wire
conventions, malformed input, hostile names, Query.*, logging."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from ext_helpers import SR, Ext, MiB, parse_response, vinfo
from sr_types import SR_TYPES

pytestmark = pytest.mark.integration

GiB = 1024 * MiB


def test_executable_is_executable(sr_type: str) -> None:
    plugin = SR_TYPES[sr_type].plugin
    assert os.access(plugin, os.X_OK), f"{plugin} is not executable"
    assert plugin.read_text().startswith("#!"), "no #! line"


def test_runs_directly_by_its_shebang(ext: Ext) -> None:
    """The toolstack runs the file itself, not through a python we choose."""
    p = subprocess.run(
        [str(ext.plugin)],
        input=Ext.request("Query.query", {"dbg": "shebang"}),
        capture_output=True,
        text=True,
        env=ext.env,
        timeout=60,
        check=False,
    )
    r = parse_response(p.returncode, p.stdout, p.stderr)
    assert r.ok, r.describe()


def test_query_query(ext: Ext) -> None:
    q = ext.ok("Query.query")
    for key in (
        "driver",
        "name",
        "description",
        "vendor",
        "copyright",
        "version",
        "required_api_version",
        "features",
        "configuration",
    ):
        assert key in q, f"query_result lacks {key}: {q}"
    assert q["driver"].lower() == ext.sr_type
    assert isinstance(q["features"], list) and q["features"]
    assert all(isinstance(f, str) for f in q["features"])
    conf = q["configuration"]
    assert SR_TYPES[ext.sr_type].config_keys <= set(conf), conf
    assert all(isinstance(v, str) and v for v in conf.values()), conf


def test_query_diagnostics(ext: Ext) -> None:
    d = ext.ok("Query.diagnostics")
    assert isinstance(d, str) and d.strip()


def test_request_in_argv1(ext: Ext) -> None:
    req = Ext.request("Query.query", {"dbg": "argv1"})
    p = ext.run_raw(None, req)
    r = parse_response(p.returncode, p.stdout, p.stderr)
    assert r.ok and r.value["driver"].lower() == ext.sr_type, r.describe()


def test_help(ext: Ext) -> None:
    p = ext.run_raw(None, "--help")
    assert p.returncode == 0, p.stderr
    text = p.stdout + p.stderr
    for method in ("Query.query", "SR.create", "VDI.create", "VDI.attach", "SR.gc"):
        assert method in text, f"--help does not mention {method}"
    assert "Traceback" not in text


def test_by_hand_form_and_log(ext: Ext, path_sr: SR) -> None:
    p = ext.run_raw(
        None,
        "VDI.create",
        f"sr={path_sr.uuid}",
        'vdi_info={"name_label": "d0", "virtual_size": "10G"}',
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    made = [v for v in path_sr.scan().values() if v["name_label"] == "d0"]
    assert len(made) == 1
    assert int(made[0]["virtual_size"]) == 10 * GiB


def test_verbose_logs_to_stderr(ext: Ext) -> None:
    quiet = ext.run_raw(Ext.request("Query.query", {"dbg": "quiet"}))
    loud = ext.run_raw(Ext.request("Query.query", {"dbg": "loud-dbg-4711"}), "-v")
    assert quiet.returncode == loud.returncode == 0
    assert parse_response(loud.returncode, loud.stdout, loud.stderr).ok
    assert len(loud.stderr) > len(quiet.stderr)
    assert "loud-dbg-4711" in loud.stderr


def test_every_call_is_logged_with_its_dbg(ext: Ext) -> None:
    ext.ok("Query.query", dbg="logged-dbg-0815")
    ext.err("VDI.stat", dbg="logged-dbg-0816", sr="nope", vdi="nope")
    log = ext.root / "var" / "log" / "sm" / "sm.log"
    assert log.exists(), "no log file under SM_ROOT (syslog only?)"
    text = log.read_text()
    assert "logged-dbg-0815" in text and "Query.query" in text
    assert "logged-dbg-0816" in text


# --- int64 on the wire -------------------------------------------------------

_CREATE = """<?xml version="1.0"?>
<methodCall><methodName>VDI.create</methodName><params><param><value><struct>
<member><name>dbg</name><value><string>i64</string></value></member>
<member><name>sr</name><value><string>{sr}</string></value></member>
<member><name>vdi_info</name><value><struct>
<member><name>name_label</name><value><string>{name}</string></value></member>
<member><name>virtual_size</name><value>{size}</value></member>
</struct></value></member>
</struct></value></param></params></methodCall>"""


@pytest.mark.parametrize(
    ("size_xml", "want"),
    [
        ("<i4>4194304</i4>", 4 * MiB),
        ("<int>4194304</int>", 4 * MiB),
        ("<i8>10737418240</i8>", 10 * GiB),
        ("<string>10737418240</string>", 10 * GiB),
    ],
)
def test_int64_inputs_and_i8_output(
    ext: Ext, path_sr: SR, size_xml: str, want: int
) -> None:
    r = ext.raw(_CREATE.format(sr=path_sr.uuid, name="sz", size=size_xml))
    assert r.ok, r.describe()
    assert int(r.value["virtual_size"]) == want
    # int64 outputs are <i8> even when they would fit an <i4>
    assert "<i8>" in r.stdout, r.stdout


def test_int64_output_above_2g(ext: Ext, path_sr: SR) -> None:
    made = path_sr.create("big", 5 * GiB)
    r = ext.call("VDI.stat", sr=path_sr.uuid, vdi=made["vdi"])
    assert r.ok and r.value["virtual_size"] == 5 * GiB
    assert f"<i8>{5 * GiB}</i8>" in r.stdout


# --- malformed requests --------------------------------------------------------

MALFORMED = [
    pytest.param("", id="empty"),
    pytest.param("not xml at all", id="garbage"),
    pytest.param("<methodCall><methodName>Query.query", id="truncated"),
    pytest.param(
        "<?xml version='1.0'?><methodCall><methodName>Query.query</methodName>"
        "<params><param><value><int>1</int></value></param></params></methodCall>",
        id="param-not-struct",
    ),
    pytest.param(
        "<?xml version='1.0'?><methodCall><methodName>Query.query</methodName>"
        "<params></params></methodCall>",
        id="no-params",
    ),
    pytest.param(
        "<?xml version='1.0'?><methodResponse><params><param><value><int>1</int>"
        "</value></param></params></methodResponse>",
        id="a-response",
    ),
    pytest.param(
        "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaaaaaaaaaaaaaaaaaa'>"
        "<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
        "<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>"
        "<!ENTITY d '&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;'>]>"
        "<methodCall><methodName>&d;</methodName></methodCall>",
        id="entity-expansion",
    ),
    pytest.param("\xff\xfe<methodCall>", id="bad-encoding"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_request_gets_a_wellformed_answer(ext: Ext, data: str) -> None:
    r = ext.raw(data)  # asserts rc 0, no traceback, parseable
    assert not r.ok
    assert r.error or r.fault


def test_unknown_method(ext: Ext) -> None:
    err = ext.err("VDI.fly", sr="x", vdi="y")
    assert err[0] in ("Unimplemented", "Backend_error"), err
    assert any("VDI.fly" in e for e in err), err


@pytest.mark.parametrize(
    ("method", "args", "needle"),
    [
        ("VDI.stat", {"sr": "s"}, "vdi"),  # missing argument
        ("VDI.stat", {"sr": 5, "vdi": "v"}, "sr"),  # wrong type
        (
            "VDI.attach",
            {"sr": "s", "vdi": "v", "dp": "d", "read_write": "yes"},
            "read_write",
        ),
        (
            "SR.create",
            {"sr": "s", "device_config": "x", "physical_size": "0"},
            "device_config",
        ),
        (
            "VDI.create",
            {"sr": "s", "vdi_info": {"virtual_size": "lots"}},
            "virtual_size",
        ),
    ],
)
def test_bad_arguments_name_the_problem(
    ext: Ext, method: str, args: dict[str, object], needle: str
) -> None:
    err = ext.err(method, **args)
    assert any(needle in e for e in err), err


# --- hostile names -------------------------------------------------------------

HOSTILE = ["../x", "/etc", "a\x00b", "x" * 300, "..", ".", "a/../../b", ""]


def _plan(first: str, others: list[str]) -> list[tuple[str, str]]:
    """(method, name) pairs: ``first`` with every hostile name, then the other
    methods each with a name in rotation (every method and every name, without
    the whole cross product: each pair is a process start)."""
    pairs = [(first, n) for n in HOSTILE]
    pairs += [(m, HOSTILE[i % len(HOSTILE)]) for i, m in enumerate(others)]
    return pairs


def test_hostile_sr_names(ext: Ext, tmp_path: Path) -> None:
    (tmp_path / "victim").mkdir()
    canary = tmp_path / "victim" / "keep"
    canary.write_text("x")
    cfg = {"path": str(tmp_path / "victim")}
    if ext.sr_type == "nfs":  # the share's root is the victim
        canary = ext.backend.export_dir / f"keep-{tmp_path.name}"
        canary.write_text("x")
        cfg = {"server": ext.backend.address, "serverpath": "/export"}
    lun = None
    if ext.sr_type == "lvmoiscsi":  # a blank LUN is the victim: it must stay blank
        from lvmo_helpers import device_config

        lun = ext.backend.add_target("hostile")
        cfg = device_config(ext.backend, lun)
    extra: dict[str, dict[str, object]] = {
        "SR.create": {"device_config": cfg, "physical_size": "0"},
        "SR.attach": {"device_config": cfg},
        "VDI.create": {"vdi_info": vinfo("h")},
        "VDI.stat": {"vdi": "v"},
    }
    others = [
        "SR.attach",
        "SR.detach",
        "SR.destroy",
        "SR.reset",
        "SR.scan",
        "VDI.create",
        "VDI.stat",
        "SR.gc",
    ]
    nfs = ext.sr_type == "nfs"
    share = sorted(os.listdir(ext.backend.export_dir)) if nfs else []
    for method, name in _plan("SR.create", others):
        r = ext.raw(_hostile_request(method, {"sr": name, **extra.get(method, {})}))
        assert not r.ok, f"{method} accepted sr={name!r}\n{r.describe()}"
    assert canary.read_text() == "x"
    if nfs:
        assert sorted(os.listdir(ext.backend.export_dir)) == share
    if lun is not None:
        with open(lun.backing, "rb") as f:
            assert f.read(1 << 20) == bytes(1 << 20), "the LUN was written to"
        ext.backend.remove_target(lun)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smroot", "victim"]
    assert ext.ok("SR.ls") == []


def test_hostile_vdi_names(ext: Ext, path_sr: SR) -> None:
    # a VHD-looking file just outside the SR directory
    outside = path_sr.data_dir.parent / "x"
    outside.write_bytes(b"conectix" + b"\0" * 504)
    keep = path_sr.create("keep")
    before = sorted(p.name for p in path_sr.data_dir.rglob("*"))
    extra: dict[str, dict[str, object]] = {
        "VDI.attach": {"dp": "d", "read_write": True},
        "VDI.activate": {"dp": "d"},
        "VDI.deactivate": {"dp": "d"},
        "VDI.detach": {"dp": "d"},
        "VDI.set_persistent": {"persistent": False},
        "VDI.set_content_id": {"content_id": "c"},
        "VDI.copy": {"url": "", "dest": path_sr.uuid},
    }
    others = [
        "VDI.stat",
        "VDI.attach",
        "VDI.activate",
        "VDI.deactivate",
        "VDI.detach",
        "VDI.set_persistent",
        "VDI.set_content_id",
        "VDI.epoch_begin",
        "VDI.epoch_end",
        "VDI.get_url",
        "VDI.similar_content",
        "VDI.copy",
        "VDI.snapshot",
        "VDI.clone",
        "VDI.compose",
    ]
    for method, name in _plan("VDI.destroy", others):
        if method in ("VDI.snapshot", "VDI.clone"):
            args: dict[str, object] = {"vdi_info": {"vdi": name}}
        elif method == "VDI.compose":
            args = {"vdi1": keep["vdi"], "vdi2": name}
        else:
            args = {"vdi": name, **extra.get(method, {})}
        r = ext.raw(_hostile_request(method, {"sr": path_sr.uuid, **args}))
        assert not r.ok, f"{method} accepted vdi={name!r}\n{r.describe()}"
    assert outside.exists()
    assert sorted(p.name for p in path_sr.data_dir.rglob("*")) == before
    assert set(path_sr.scan()) == {keep["vdi"]}


def _hostile_request(method: str, args: dict[str, object]) -> str:
    """A request whose strings may hold NUL (xmlrpc.client writes it raw,
    which makes the XML itself invalid: that too must get an answer)."""
    return Ext.request(method, {"dbg": "hostile", **args})


def test_name_labels_are_data_not_paths(ext: Ext, path_sr: SR) -> None:
    made = path_sr.create("../../etc/passwd")
    assert made["name_label"] == "../../etc/passwd"
    assert path_sr.ok("VDI.stat", vdi=made["vdi"])["name_label"] == "../../etc/passwd"
    for p in path_sr.data_dir.rglob("*"):
        assert p.resolve().is_relative_to(path_sr.data_dir.resolve())
