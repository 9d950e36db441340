"""A zygote rehearses Query.query before its first fork (``zygote.rehearse``),
and the rehearsal leaves the zygote as it found it: descriptors, ``sys.std*``,
``__main__``, umask; only its log line shows that it ran.  Each plugin runs in
a process of its own, as the dispatcher starts a zygote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
PLUGINS = {
    "ext": REPO / "plugins" / "ext" / "EXTSR",
    "nfs": REPO / "plugins" / "nfs" / "NFSSR",
    "lvmoiscsi": REPO / "plugins" / "lvmoiscsi" / "LVMoISCSISR",
}
SCRIPT = r"""
import json, os, sys
from dispatcher import zygote

def state():
    fds = {}
    for fd in sorted(os.listdir("/proc/self/fd")):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    mask = os.umask(0o022)
    os.umask(mask)
    return {"fds": fds, "umask": mask, "main": id(sys.modules["__main__"]), "env": dict(os.environ), "path": list(sys.path),
            "std": [id(s) for s in (sys.stdin, sys.stdout, sys.stderr)]}

plugin = sys.argv[1]
code = zygote.load(plugin)
os.umask(0o027)
before = state()
zygote.rehearse(code, plugin)
import gc
gc.collect()
after = state()
print(json.dumps({"before": before, "after": after}))
"""



def rehearsed(plugin: Path, tmp_path: Path) -> dict[str, Any]:
    """SCRIPT's report on ``plugin``: the zygote's state before and after."""
    env = dict(os.environ, SM_ROOT=str(tmp_path / "root"), PYTHONPATH=f"{REPO / 'lib'}:{REPO}")
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(plugin)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


@pytest.mark.parametrize("sr_type", sorted(PLUGINS))
def test_the_rehearsal_leaves_the_zygote_as_it_was(sr_type: str, tmp_path: Path) -> None:
    got = rehearsed(PLUGINS[sr_type], tmp_path)
    assert got["after"] == got["before"]
    assert got["before"]["umask"] == 0o027
    # it ran: the plugin logged the rehearsal's call, and said what it was
    logs = [f.read_text() for f in (tmp_path / "root").rglob("*.log")]
    lines = [ln for text in logs for ln in text.splitlines() if "Query.query" in ln]
    assert lines and all("[warm parent rehearsal]" in ln for ln in lines), logs


def test_a_plugin_whose_runtime_offers_no_rehearsal_is_not_run(tmp_path: Path) -> None:
    """Only the plugin's runtime knows a call free of side effects: a plugin
    not on smcommon.plugin (this one writes a file when run) is not rehearsed."""
    marker = tmp_path / "ran"
    plugin = tmp_path / "OTHERSR"
    plugin.write_text(f"#!/usr/bin/env python3\nopen({str(marker)!r}, 'w').close()\n")
    got = rehearsed(plugin, tmp_path)
    assert got["after"] == got["before"]
    assert not marker.exists()
