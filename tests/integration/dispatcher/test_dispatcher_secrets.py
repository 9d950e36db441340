"""Secrets stay secret: after a run of an SR type whose device_config holds
CHAP-style passwords (chap_plugin.py: declared ``secret_keys``, logged
carelessly, echoed in an error) through the dispatcher and by hand, no file
under SM_ROOT (host state, outcomes, the plugins' log, the dispatcher's log,
the SR's own files), no answer and no stderr holds a password; host state is
0600 in 0700 directories."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dispatcher_testlib import REPO, Daemon

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-Chap-Pw"
MUTUAL = "mutu4l-Chap-Pw"


def ok(r: dict[str, Any]) -> Any:
    assert r.get("Status") == "Success", r
    return r["Value"]


@pytest.fixture
def chap_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "chap-plugins" / "chap"
    d.mkdir(parents=True)
    exe = d / "CHAPSR"
    exe.write_text(f"#!{sys.executable}\n" + (Path(__file__).parent / "chap_plugin.py").read_text())
    exe.chmod(0o755)
    monkeypatch.setenv("CHAP_TEST_REPO", str(REPO))
    return d.parent


def test_no_secret_is_written_anywhere(
    start_in_mode: Callable[..., Daemon], chap_plugins: Path, sm_root: Path, tmp_path: Path
) -> None:
    log_file = sm_root / "var" / "log" / "sm" / "dispatcher.log"
    d = start_in_mode("--log-file", str(log_file), plugins=chap_plugins)
    sr_dir = tmp_path / "sr-chap"
    dc = {"path": str(sr_dir), "chapuser": "admin", "chappassword": SECRET,
          "incoming_chappassword": MUTUAL}  # fmt: skip
    chap, root = d.unix("/chap"), d.unix("/")
    answers: list[Any] = []
    answers.append(chap.SR.create({"dbg": "c", "sr": "chap1", "device_config": dc,
                                   "physical_size": "0"}))  # fmt: skip
    answers.append(ok(root.SR.attach({"dbg": "c", "sr": "chap1", "device_config": dc})))
    v = ok(root.VDI.create({"dbg": "c", "sr": "chap1",
                            "vdi_info": {"name_label": "d", "virtual_size": "4194304"}}))  # fmt: skip
    answers.append(root.VDI.snapshot({"dbg": "c", "sr": "chap1", "vdi_info": v}))
    answers.append(root.Query.diagnostics({"dbg": "c"}))
    answers.append(root.SR.stat({"dbg": "c", "sr": "chap1"}))
    answers.append(root.Dispatcher.status({"dbg": "c"}))
    # an error that holds the password (a tool echoing its argv): masked
    bad = dict(dc, chapuser="echo")
    r = chap.SR.attach({"dbg": "c", "sr": "chap2", "device_config": bad})
    assert r["Status"] == "Failure" and "******" in str(r), r
    answers.append(r)
    answers.append(chap.SR.create({"dbg": "c", "sr": "chap3", "physical_size": "0",
                                   "device_config": dict(dc, path="/etc/chap3")}))  # fmt: skip
    ok(root.SR.detach({"dbg": "c", "sr": "chap1"}))
    # the plugin by hand, -v: log lines on stderr too
    p = subprocess.run(
        [str(chap_plugins / "chap" / "CHAPSR"), "-v", "SR.attach", "sr=chap1",
         f"device_config={__import__('json').dumps(dc)}"],
        capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, SM_ROOT=str(sm_root)),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "logging in as admin with ******" in p.stderr, p.stderr
    rc, err = d.stop()
    assert rc == 0
    # nothing holds a secret: answers, stderr, every file under SM_ROOT and the SR
    for text in (str(answers), p.stdout, p.stderr, err):
        assert SECRET not in text and MUTUAL not in text
    files = [f for base in (sm_root, sr_dir) for f in base.rglob("*") if f.is_file()]
    assert log_file in files and sm_root / "var" / "log" / "sm" / "sm.log" in files
    for f in files:
        data = f.read_bytes()
        assert SECRET.encode() not in data and MUTUAL.encode() not in data, f
    # the host registry kept the declared, non-secret keys
    reg = (sm_root / "var" / "lib" / "sm" / "sr" / "chap1.json").read_text()
    assert '"chapuser": "admin"' in reg and "chappassword" not in reg
    # host state: 0600 files in 0700 directories
    state = sm_root / "var" / "lib" / "sm"
    for f in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (0o700 if f.is_dir() else 0o600), (f, oct(mode))
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((sm_root / "var" / "log" / "sm" / "sm.log").stat().st_mode) == 0o600
