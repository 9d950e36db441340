"""A plugin run directly imports only what its call needs: start-up is most of
a short call's time when the toolstack runs one process per call (issue 13:
direct VDI.* within 1.3x the interpreter's floor).

Each call runs the real EXTSR executable with ``python -X importtime`` and
reads, from its stderr, every module the process imported.  The modules in
HEAVY are ones the plugins must not need: ``dataclasses`` alone (it imports
``inspect``, ``ast`` and ``dis``) cost a direct VDI.snapshot 6 ms, and its
compiled methods 7 ms more, before ``smcommon.record``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from dispatcher import wire

pytestmark = pytest.mark.integration

EXTSR = Path(__file__).resolve().parents[3] / "plugins" / "ext" / "EXTSR"
HEAVY = {
    "dataclasses", "inspect", "typing", "ast", "dis",
    "xmlrpc.client", "http.client", "email.parser", "decimal", "datetime",
    "subprocess", "asyncio", "uuid", "tempfile", "shutil",
}  # fmt: skip
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", re.MULTILINE)


def run(method: str, args: dict[str, Any], root: Path) -> tuple[str, set[str]]:
    """The call's status and the modules its process imported."""
    env = dict(os.environ, SM_ROOT=str(root))
    p = subprocess.run(
        [sys.executable, "-X", "importtime", str(EXTSR)],
        input=wire.dumps_call(method, {"dbg": "t", **args}),
        capture_output=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    resp = wire.parse_response(p.stdout)
    imported = set(_IMPORTED.findall(p.stderr.decode("utf-8", "replace")))
    assert imported, p.stderr[-2000:]  # -X importtime reported the imports
    value = resp.value["Value"] if resp.status == "Success" else resp.error
    return value, imported


def test_the_calls_of_a_vdi_life_run_directly_import_nothing_heavy(tmp_path: Path) -> None:
    sr, dc = str(uuid.uuid4()), {"path": str(tmp_path / "sr")}
    root = tmp_path / "root"
    heavy: dict[str, list[str]] = {}

    def call(method: str, **args: Any) -> Any:
        value, imported = run(method, args, root)
        assert "smcommon.plugin" in imported  # the parse of -X importtime's lines works
        if imported & HEAVY:
            heavy[method] = sorted(imported & HEAVY)
        return value

    call("SR.create", sr=sr, device_config=dc, physical_size=0)
    call("SR.attach", sr=sr, device_config=dc)
    vdi = call("VDI.create", sr=sr, vdi_info={"name_label": "a", "virtual_size": 1 << 20})["vdi"]
    assert call("VDI.stat", sr=sr, vdi=vdi)["vdi"] == vdi
    snap = call("VDI.snapshot", sr=sr, vdi_info={"vdi": vdi})["vdi"]
    assert call("VDI.clone", sr=sr, vdi_info={"vdi": snap})["vdi"] not in (vdi, snap)
    assert call("Query.query")["driver"] == "ext"
    assert {v["vdi"] for v in call("SR.scan", sr=sr)} >= {vdi, snap}
    dp = {"dp": "vm1/xvda", "sr": sr, "vdi": vdi}
    call("VDI.attach", **dp, read_write=True)
    call("VDI.activate", **dp)
    call("VDI.deactivate", **dp)
    call("VDI.detach", **dp)
    call("VDI.destroy", sr=sr, vdi=vdi)
    assert heavy == {}
