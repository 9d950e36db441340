"""smcommon.devsafety without devices: the SR roots, and a disk whose partitions
or holders are mounted.

The partition and holder cases use a fake runner answering lsblk's JSON:
this machine's kernel neither scans partitions of loop devices nor has
device-mapper, so no real device here can have a partition or a holder (the
real-device cases are tests/integration/ext/test_ext_device_config.py).  The
JSON has the shape ``lsblk --json --output PATH,MAJ:MIN,TYPE,MOUNTPOINTS``
prints for a device (as it does for the loop devices there), with the
``children`` lsblk nests partitions and holders under.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from smcommon import devsafety
from smcommon.errors import BackendError
from smcommon.runner import Result

DISK = {
    "path": "/dev/sdz", "maj:min": "8:240", "type": "disk", "mountpoints": [None],
    "children": [
        {"path": "/dev/sdz1", "maj:min": "8:241", "type": "part", "mountpoints": [None]},
        {
            "path": "/dev/sdz2", "maj:min": "8:242", "type": "part", "mountpoints": [None],
            "children": [
                {"path": "/dev/mapper/vg-data", "maj:min": "253:3", "type": "lvm",
                 "mountpoints": [None]},
            ],
        },
    ],
}  # fmt: skip
NO_SIGNATURES = json.dumps({"signatures": []})


class Runner:
    def __init__(self, lsblk: dict[str, Any], wipefs: str = NO_SIGNATURES) -> None:
        self.lsblk = json.dumps({"blockdevices": [lsblk]}, indent=3)
        self.wipefs = wipefs
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> Result:
        self.calls.append(argv)
        out = self.lsblk if argv[0] == "lsblk" else self.wipefs
        return Result(0, out, "")


def _mounted(disk: dict[str, Any], path: str, where: str) -> dict[str, Any]:
    text = json.dumps(disk).replace(
        f'"path": "{path}", "maj:min"', f'"path": "{path}", "MOUNTED": 1, "maj:min"'
    )
    doc = json.loads(text)

    def fix(n: dict[str, Any]) -> None:
        if n.pop("MOUNTED", None):
            n["mountpoints"] = [where]
        for c in n.get("children", []):
            fix(c)

    fix(doc)
    return doc


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("/dev/sdz1", "/dev/sdz1 (part of /dev/sdz) is mounted at /boot"),
        ("/dev/mapper/vg-data", "/dev/mapper/vg-data (lvm of /dev/sdz) is mounted at /boot"),
    ],
)
def test_a_mounted_partition_or_holder_makes_the_disk_in_use(which: str, words: str) -> None:
    run = Runner(_mounted(DISK, which, "/boot"))
    for create, force in ((True, False), (True, True), (False, False)):
        with pytest.raises(BackendError) as e:
            devsafety.check_device("/dev/sdz", create, force, run)
        assert e.value.code == "DEVICE_IN_USE"
        assert words in e.value.details[0]
    assert run.calls[0] == ["lsblk", "--json", "--output", "PATH,MAJ:MIN,TYPE,MOUNTPOINTS", "/dev/sdz"]


def test_partitions_unmounted_still_hold_something() -> None:
    run = Runner(DISK)
    with pytest.raises(BackendError) as e:
        devsafety.check_device("/dev/sdz", True, False, run)
    assert e.value.code == "DEVICE_NOT_EMPTY"
    assert "partitions or holders /dev/sdz1, /dev/sdz2, /dev/mapper/vg-data" in e.value.details[0]
    devsafety.check_device("/dev/sdz", True, True, run)  # forced
    devsafety.check_device("/dev/sdz", False, False, run)  # attach: not asked


def test_unreadable_tool_output_is_a_clear_error() -> None:
    run = Runner({"path": "/dev/sdz", "maj:min": "8:240", "type": "disk", "mountpoints": [None]},
                 wipefs="not json")  # fmt: skip
    with pytest.raises(BackendError) as e:
        devsafety.check_device("/dev/sdz", True, False, run)
    assert e.value.code == "DEVICE_PROBE_FAILED" and "wipefs" in e.value.details[0]


def test_sr_roots_default_and_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SM_SR_PATHS", raising=False)
    monkeypatch.delenv("SM_ROOT", raising=False)
    assert devsafety.sr_roots() == [Path("/srv"), Path("/var/lib/sm")]
    monkeypatch.setenv("SM_ROOT", "/tmp/x")
    assert devsafety.sr_roots()[-1] == Path("/tmp/x/sr")
    monkeypatch.setenv("SM_SR_PATHS", "/a:relative::/b")
    assert devsafety.sr_roots() == [Path("/a"), Path("/b")]


def test_allowed_path_resolves_what_exists(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    assert devsafety.allowed_path(str(root / "d" / "new" / "sr"), [root]) == root / "d" / "new" / "sr"
    (root / "out").symlink_to("/etc")
    with pytest.raises(BackendError) as e:
        devsafety.allowed_path(str(root / "out" / "sr"), [root])
    assert e.value.code == "PATH_NOT_ALLOWED" and "resolved: /etc/sr" in e.value.details[0]
    with pytest.raises(BackendError) as e:  # the root itself: said so, not "not under"
        devsafety.allowed_path(str(root), [root])
    assert e.value.code == "PATH_NOT_ALLOWED"
    assert e.value.details == [f"{root} is an SR root itself: an SR is a directory below one ({root})"]


def test_the_hosts_own_directories_are_refused(tmp_path: Path) -> None:
    from smcommon.paths import Paths

    paths = Paths(tmp_path / "root")
    state = paths.state_dir
    reserved = devsafety.host_dirs(paths)
    roots = [state, paths.root]
    for bad in (state, state / "sr", state / "sr" / "x", state / "import", paths.run_dir / "a",
                paths.etc_dir, paths.log_dir / "b"):  # fmt: skip
        with pytest.raises(BackendError) as e:
            devsafety.allowed_path(str(bad), roots, reserved)
        assert e.value.code == "PATH_NOT_ALLOWED" and "host's own directory" in e.value.details[0]
    assert devsafety.allowed_path(str(state / "srs"), roots, reserved) == state / "srs"
    # a symlink into a host directory is resolved first
    state.mkdir(parents=True)
    (state / "sr").mkdir()
    (tmp_path / "root" / "sneaky").symlink_to(state / "sr")
    with pytest.raises(BackendError):
        devsafety.allowed_path(str(tmp_path / "root" / "sneaky" / "x"), roots, reserved)


def test_force_values() -> None:
    assert devsafety.forced({"force": "true"}) and devsafety.forced({"force": " Yes"})
    assert not devsafety.forced({}) and not devsafety.forced({"force": "no"})
