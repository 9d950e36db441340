"""A warm parent imports what its plugin's calls import (the WARM_IMPORTS
lists: dispatcher/zygote.py).  A module left out is imported again by every
call's child, at the cost of a cold import and the copying of the pages it
touches: leaving smcommon.engine.front out cost each ext call about 100 page
copies and 0.4 ms.  The probe forks each call from a process prepared as the
warm parent is (``zygote.load``) and reports what the call imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from dispatcher import wire

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
PROBE = Path(__file__).with_name("warm_imports_probe.py")
PLUGINS = {
    "ext": REPO / "plugins" / "ext" / "EXTSR",
    "nfs": REPO / "plugins" / "nfs" / "NFSSR",
    "lvmoiscsi": REPO / "plugins" / "lvmoiscsi" / "LVMoISCSISR",
}


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(
        os.environ, SM_ROOT=str(tmp_path / "root"), PYTHONPATH=f"{REPO / 'lib'}:{REPO}"
    )


def probe(
    plugin: Path, calls: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> dict[str, Any]:
    requests = tmp_path / "requests.json"
    requests.write_text(
        json.dumps([wire.dumps_call(m, {"dbg": "t", **a}).decode() for m, a in calls])
    )
    p = subprocess.run(
        [sys.executable, str(PROBE), str(plugin), str(requests)],
        check=False, capture_output=True, text=True, env=_env(tmp_path), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def direct(plugin: Path, method: str, args: dict[str, Any], tmp_path: Path) -> Any:
    p = subprocess.run(
        [sys.executable, str(plugin)], input=wire.dumps_call(method, {"dbg": "t", **args}),
        check=False, capture_output=True, env=_env(tmp_path), timeout=120,
    )  # fmt: skip
    resp = wire.parse_response(p.stdout)
    assert resp.status == "Success", (method, resp.error, p.stderr)
    return resp.value["Value"]


@pytest.mark.parametrize("sr_type", sorted(PLUGINS))
def test_every_warm_import_names_a_module(sr_type: str, tmp_path: Path) -> None:
    got = probe(PLUGINS[sr_type], [("Query.query", {})], tmp_path)
    assert got["unknown"] == []
    [call] = got["calls"]
    assert "<name>Status</name><value>Success</value>" in call["response"]
    assert call["imported"] == [], (
        f"Query.query of {sr_type} imported {call['imported']}"
    )


def test_the_calls_of_a_vm_life_import_nothing(tmp_path: Path) -> None:
    """Every call a VM's start, run and stop and the toolstack's polling make,
    on a real ext SR (a directory)."""
    ext = PLUGINS["ext"]
    sr, dc = str(uuid.uuid4()), {"path": str(tmp_path / "sr")}
    direct(
        ext, "SR.create", {"sr": sr, "device_config": dc, "physical_size": 0}, tmp_path
    )
    direct(ext, "SR.attach", {"sr": sr, "device_config": dc}, tmp_path)
    vdi = direct(
        ext,
        "VDI.create",
        {"sr": sr, "vdi_info": {"name_label": "a", "virtual_size": 1 << 20}},
        tmp_path,
    )["vdi"]
    dp = {"dp": "vm1/xvda", "sr": sr, "vdi": vdi}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("SR.attach", {"sr": sr, "device_config": dc}),
        ("Query.query", {}),
        ("Query.diagnostics", {}),
        ("SR.ls", {}),
        ("SR.stat", {"sr": sr}),
        ("SR.scan", {"sr": sr}),
        ("VDI.stat", {"sr": sr, "vdi": vdi}),
        ("VDI.get_by_name", {"sr": sr, "name": "a"}),
        (
            "VDI.create",
            {"sr": sr, "vdi_info": {"name_label": "b", "virtual_size": 1 << 20}},
        ),
        ("VDI.snapshot", {"sr": sr, "vdi_info": {"vdi": vdi}}),
        ("VDI.clone", {"sr": sr, "vdi_info": {"vdi": vdi}}),
        ("VDI.set_persistent", {"sr": sr, "vdi": vdi, "persistent": True}),
        ("VDI.set_content_id", {"sr": sr, "vdi": vdi, "content_id": "c"}),
        ("VDI.similar_content", {"sr": sr, "vdi": vdi}),
        ("VDI.epoch_begin", {"sr": sr, "vdi": vdi}),
        ("VDI.attach", {**dp, "read_write": True}),
        ("VDI.activate", dp),
        ("VDI.deactivate", dp),
        ("VDI.detach", dp),
        ("VDI.epoch_end", {"sr": sr, "vdi": vdi}),
        ("VDI.stat", {"sr": sr, "vdi": str(uuid.uuid4())}),  # an error answered
        ("VDI.destroy", {"sr": sr, "vdi": vdi}),
        ("SR.gc", {"sr": sr}),
    ]
    got = probe(ext, calls, tmp_path)
    assert got["unknown"] == []
    imported = {}
    for (method, _args), call in zip(calls, got["calls"]):
        assert "<name>Status</name>" in call["response"], (
            method,
            call["response"][:500],
        )
        if method != "VDI.stat" or "Success" in call["response"]:
            assert "<value>Success</value>" in call["response"], (
                method,
                call["response"][:500],
            )
        if call["imported"]:
            imported[method] = call["imported"]
    assert imported == {}
