"""smctl as people and scripts use it: against the daemon (socket, URL), and
--direct; output, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dispatcher_testlib import REPO, Daemon
from testenv import CI_PATH, venv_script

pytestmark = pytest.mark.integration

EXTSR = REPO / "plugins" / "ext" / "EXTSR"


def smctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.smctl", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_entry_points_are_installed_beside_the_interpreter() -> None:
    """The venv's scripts work without the venv on PATH (as README runs them)."""
    for name in ("smctl", "sm-dispatcher", "vhd"):
        assert venv_script(name).is_file(), f"{name}: pip install -e . (scripts/setup)"
    assert os.environ["PATH"] == CI_PATH
    r = subprocess.run(
        [str(venv_script("smctl")), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    assert "cancel TASK" in r.stdout and "exit codes" in r.stdout


def test_cannot_connect_is_exit_3(tmp_path: Path, sm_root: Path) -> None:
    r = smctl("--socket", str(tmp_path / "nope.sock"), "sr-ls")
    assert r.returncode == 3
    assert r.stderr.startswith("smctl: error: cannot reach the dispatcher")
    r = smctl("--url", "http://127.0.0.1:9/", "sr-ls")
    assert r.returncode == 3


@pytest.mark.parametrize(
    "args",
    [
        ["vdi-create", "sr1"],
        ["vdi-create", "sr1", "--name", "d", "--size", "10Q"],
        ["nosuch"],
        [],
    ],
)
def test_usage_errors_are_exit_2(args: list[str]) -> None:
    r = smctl(*args)
    assert r.returncode == 2
    assert "usage:" in r.stderr


def test_results_errors_and_json(daemon: Daemon) -> None:
    s = ["--socket", str(daemon.socket)]
    r = smctl(*s, "vdi-stat", "sr1", "ok", "--type", "fake")
    assert r.returncode == 0
    assert "virtual_size" in r.stdout and "(10M)" in r.stdout
    r = smctl(*s, "--json", "vdi-stat", "sr1", "ok", "--type", "fake")
    assert r.returncode == 0
    assert json.loads(r.stdout)["virtual_size"] == 10 << 20
    r = smctl(*s, "vdi-stat", "sr1", "missing", "--type", "fake")
    assert r.returncode == 1
    assert (
        r.stderr
        == "smctl: error: VDI.stat: Vdi_does_not_exist: VDI missing does not exist\n"
    )
    r = smctl(*s, "--json", "vdi-stat", "sr1", "missing", "--type", "fake")
    assert json.loads(r.stdout) == {
        "Status": "Failure",
        "ErrorDescription": ["Vdi_does_not_exist", "missing"],
    }
    r = smctl(*s, "vdi-stat", "sr1", "fail", "--type", "fake")
    assert r.returncode == 1
    first, *detail = r.stderr.splitlines()
    assert first.startswith("smctl: error: VDI.stat: PLUGIN_FAILED: ")
    assert "  fake: the backend is on fire" in detail
    r = smctl("--url", str(daemon.url), "sr-ls")
    assert r.returncode == 0
    assert sorted(r.stdout.split()) == ["fake-sr1", "other-sr1", "shared-sr"]
    r = smctl(*s, "query")
    assert r.stdout.splitlines()[0].split() == ["TYPE", "VERSION", "NAME"]
    assert r.returncode == 0
    r = smctl(*s, "vdi-stat", "sr-unknown", "ok")
    assert r.returncode == 1
    assert "UNKNOWN_SR" in r.stderr.splitlines()[0]


def test_cancel_from_smctl(daemon: Daemon) -> None:
    s = ["--socket", str(daemon.socket)]
    victim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dispatcher.smctl",
            *s,
            "--dbg",
            "cli-task",
            "vdi-stat",
            "sr1",
            "sleep",
            "--type",
            "fake",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = smctl(*s, "--json", "status")
        if any(
            c["dbg"] == "cli-task" and c["pids"]
            for c in json.loads(st.stdout)["running"]
        ):
            break
        time.sleep(0.05)
    r = smctl(*s, "cancel", "cli-task")
    assert r.returncode == 0, r.stderr
    _out, err = victim.communicate(timeout=30)
    assert victim.returncode == 1
    assert "Cancelled: the call cli-task was cancelled" in err
    r = smctl(*s, "cancel", "cli-task")
    assert r.returncode == 1
    assert "Does_not_exist" in r.stderr


def test_direct_runs_the_plugin_without_a_daemon(
    plugins_dir: Path, sm_root: Path
) -> None:
    p = ["--direct", "--plugins-dir", str(plugins_dir)]
    r = smctl(*p, "--json", "vdi-stat", "sr1", "ok", "--type", "fake")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vdi"] == "ok"
    r = smctl(*p, "vdi-stat", "sr1", "ok", "--type", "nosuch")
    assert r.returncode == 3
    assert "no plugin for SR type 'nosuch'" in r.stderr
    r = smctl(*p, "sr-ls")
    assert sorted(r.stdout.split()) == ["fake-sr1", "other-sr1", "shared-sr"]


@pytest.mark.parametrize("mode", ["daemon", "direct"])
def test_a_session_with_the_ext_plugin(
    mode: str, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    if not EXTSR.exists():
        pytest.skip(f"{EXTSR} does not exist yet")
    if mode == "daemon":
        d = start_daemon(plugins=REPO / "plugins")
        where = ["--socket", str(d.socket)]
    else:
        where = ["--direct"]
    srdir = tmp_path / "sr1"
    srdir.mkdir()
    r = smctl(*where, "sr-create", "ext", "--path", str(srdir))
    assert r.returncode == 0, r.stderr
    sr = r.stdout.strip()
    assert len(sr) == 36
    r = smctl(*where, "vdi-create", sr, "--name", "d0", "--size", "10G")
    assert r.returncode == 0, r.stderr
    r = smctl(*where, "vdi-list", sr)
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split() == [
        "VDI",
        "NAME",
        "SIZE",
        "USED",
        "RO",
        "SNAPSHOT",
        "PERSISTENT",
    ]
    vdi, name, size, *_ = row.split()
    assert (name, size) == ("d0", "10G")
    r = smctl(*where, "vdi-snapshot", sr, vdi, "--name", "s0")
    assert r.returncode == 0, r.stderr
    r = smctl(*where, "--json", "vdi-get-by-name", sr, "s0")
    assert json.loads(r.stdout)["is_a_snapshot"] is True
    assert smctl(*where, "vdi-destroy", sr, vdi).returncode == 0
    r = smctl(*where, "vdi-stat", sr, vdi)
    assert r.returncode == 1 and "Vdi_does_not_exist" in r.stderr
    assert smctl(*where, "sr-detach", sr).returncode == 0
    r = smctl(*where, "vdi-list", sr)
    assert r.returncode == 1 and "Sr_not_attached" in r.stderr


def test_an_sr_attached_by_hand_is_known_to_the_dispatcher(
    start_daemon: Callable[..., Daemon], tmp_path: Path, sm_root: Path
) -> None:
    """Issue 7 item 5: the plugin run by hand on this host (same SM_ROOT)
    attaches an SR; the dispatcher routes, lists and reports it."""
    d = start_daemon(plugins=REPO / "plugins")
    where = ["--socket", str(d.socket)]
    sr = "0c1e7bd4-64f4-4e9e-9a3c-3f8b1b7f0a11"
    dc = json.dumps({"path": str(tmp_path / "made-by-create" / "sr1")})
    for method, args in (
        ("SR.create", [f"sr={sr}", f"device_config={dc}", "physical_size=1G"]),
        ("SR.attach", [f"sr={sr}", f"device_config={dc}"]),
    ):
        r = subprocess.run(
            [str(EXTSR), method, *args], capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    for name in ("b", "a", "a"):
        r = smctl(*where, "vdi-create", sr, "--name", name, "--size", "4M")
        assert r.returncode == 0, r.stderr
    r = smctl(*where, "--json", "vdi-list", sr)
    created = [v["vdi"] for v in json.loads(r.stdout)]  # SR.scan: oldest first
    r = smctl(*where, "vdi-list", sr)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    # by name, then creation time
    assert [(row[1], row[0]) for row in rows] == [
        ("a", created[1]), ("a", created[2]), ("b", created[0]),
    ]  # fmt: skip
    r = smctl(*where, "--json", "status")
    assert {"sr": sr, "type": "ext"} in json.loads(r.stdout)["srs"]
    # item 3: a local copy needs no URL, and the global --url is not the copy's
    r = smctl(*where, "-q", "sr-create", "ext", "--path", str(tmp_path / "sr2"))
    assert r.returncode == 0, r.stderr
    sr2 = r.stdout.strip()
    r = smctl(*where, "vdi-copy", sr, created[0], "--dest", sr2)
    assert r.returncode == 0, r.stderr
    copy = r.stdout.strip()
    r = smctl(*where, "--json", "vdi-stat", sr2, copy)
    assert r.returncode == 0 and json.loads(r.stdout)["name_label"] == "b", r.stderr
    elsewhere = "5b0d0c1e-0000-4000-8000-000000000000"  # an SR of the remote, not here
    r = smctl(*where, "vdi-copy", sr, created[0], "--dest", elsewhere,
              "--remote", "https://127.0.0.1:9/")  # fmt: skip
    # not a peer of this host (no pool.json): refused before anything is sent
    assert r.returncode == 1 and "REMOTE_NOT_A_PEER" in r.stderr and "127.0.0.1" in r.stderr
    r = smctl(*where, "sr-stat", sr)
    assert r.returncode == 0, r.stderr
    stat = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert stat["total"] == "1073741824 (1G)"  # SR.create's physical_size, reported
    assert stat["vdis"] == "3"
    r = smctl(*where, "--json", "vdi-stat", "0c1e7bd4-0000-4e9e-9a3c-3f8b1b7f0a11", "x")
    assert r.returncode == 1
    r = smctl(*where, "vdi-stat", "0c1e7bd4-0000-4e9e-9a3c-3f8b1b7f0a11", "x")
    assert "UNKNOWN_SR" in r.stderr and "smctl sr-attach" in r.stderr
    assert "/<type>" not in r.stderr


def test_sr_stat_counts_vdis_hidden_parents_and_garbage(tmp_path: Path, sm_root: Path) -> None:
    where = ["--direct"]
    r = smctl(*where, "sr-create", "ext", "--path", str(tmp_path / "sr"))
    assert r.returncode == 0, r.stderr
    sr = r.stdout.strip()
    r = smctl(*where, "--json", "vdi-create", sr, "--name", "d", "--size", "8M")
    vdi = json.loads(r.stdout)["vdi"]
    assert smctl(*where, "vdi-snapshot", sr, vdi).returncode == 0
    r = smctl(*where, "--json", "sr-stat", sr)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert (st["vdis"], st["hidden_parents"], st["garbage_volumes"]) == (2, 1, 0)
    assert st["used"] == st["vdi_bytes"] + st["hidden_parent_bytes"] + st["garbage_bytes"]
    assert 0 < st["free"] <= st["total"]


def _on_a_terminal(*args: str) -> str:
    """smctl with stdout and stderr on a pseudo-terminal: everything it wrote there."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.smctl", *args],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=REPO,
    )  # fmt: skip
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        p.wait(120)
    assert p.returncode == 0, out
    return out.decode("utf-8", "replace")


def test_progress_bar_only_on_a_terminal(
    start_daemon: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """smctl vdi-copy draws a progress bar on a terminal (and erases it); with
    --json, or with stderr off a terminal, it writes nothing more."""
    if not EXTSR.exists():
        pytest.skip(f"{EXTSR} does not exist yet")
    from smcommon import vhd

    monkeypatch.setenv("SM_PROGRESS_INTERVAL", "0.02")  # the plugin's and smctl's
    d = start_daemon(plugins=REPO / "plugins")
    sock = ["--socket", str(d.socket)]
    srs = []
    for name in ("s1", "s2"):
        (tmp_path / name).mkdir()
        r = smctl(*sock, "sr-create", "ext", "--path", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        srs.append(r.stdout.strip())
    sm = d.unix("/")
    size = 256 << 20
    vdi = sm.VDI.create(
        {"dbg": "t", "sr": srs[0], "vdi_info": {"name_label": "big", "virtual_size": size}}
    )["Value"]["vdi"]
    a = {"dbg": "t", "sr": srs[0], "vdi": vdi, "dp": "fill"}
    leaf = sm.VDI.attach(dict(a, read_write=True))["Value"]["params"]
    chunk = bytes(range(1, 256)) * (8 << 20 // 255 + 1)
    for off in range(0, size, 8 << 20):
        vhd.write(leaf, off, chunk[: 8 << 20])
    sm.VDI.detach(a)

    shown = _on_a_terminal(*sock, "vdi-copy", srs[0], vdi, "--dest", srs[1])
    assert "\rcopy  [" in shown and "%" in shown, shown
    new = shown.rsplit("\x1b[K", 1)[-1].strip()
    assert len(new) == 36, shown
    shown = _on_a_terminal(*sock, "--json", "vdi-copy", srs[0], vdi, "--dest", srs[1])
    assert "\r" not in shown.replace("\r\n", "\n") and "copy  [" not in shown, shown
    r = smctl(*sock, "vdi-copy", srs[0], vdi, "--dest", srs[1])
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.strip()) == 36, r
