"""The kernel initiator path of smcommon.lun (iscsiadm, then the LUN's disk by
SCSI id) over replayed real outputs: this kernel has no iSCSI initiator.

The one synthetic answer is ``--op update ... authmethod -v None`` (exit 0, no
output, like every captured node-record update): it was not captured.
"""

from __future__ import annotations

from pathlib import Path

from replay import Capture, Replay, load, synthetic
from smcommon.lun import KernelInitiator, LunSpec
from test_scsi import fake_sysfs

PORTAL = "10.251.77.2:3260"
LUN1 = "iqn.2026-11.test.storage:lun1"
LUN2_ID = "360000000000000000e00000000010002"
UPDATED = synthetic(0)  # not captured: see the module doc


def login_script() -> list[tuple[list[str], Capture]]:
    node = ["iscsiadm", "-m", "node", "-T", LUN1, "-p", PORTAL]
    return [
        (["iscsiadm", "-m", "node", "-o", "new", "-T", LUN1, "-p", PORTAL],
         load("iscsiadm", "node_new_lun1")),
        ([*node, "--op", "update", "-n", "node.session.auth.authmethod", "-v", "None"], UPDATED),
        ([*node, "-l"], load("iscsiadm", "login_success")),
    ]


def disks_script() -> list[tuple[list[str], Capture]]:
    return [
        (["iscsiadm", "-m", "session"], load("iscsiadm", "session")),
        (["iscsiadm", "-m", "session", "-r", "4", "-P", "3"],
         load("iscsiadm", "session_r_sid_P3")),
    ]


def test_attach_finds_the_lun_by_scsi_id_and_detach_logs_out(tmp_path: Path) -> None:
    sysfs = str(fake_sysfs(tmp_path / "sys"))
    spec = LunSpec(((PORTAL.split(":")[0], 3260),), LUN1, LUN2_ID)
    replay = Replay([*login_script(), *disks_script()])
    ini = KernelInitiator(tmp_path / "run", replay, sysfs=sysfs)
    state = ini.attach("sr1", spec, tmp_path / "state")
    replay.done()
    assert state == {"backend": "kernel", "device": "/dev/sdb", "iqn": LUN1, "portals": [PORTAL]}
    replay.script += [(["iscsiadm", "-m", "node", "-T", LUN1, "-p", PORTAL, "-u"],
                       load("iscsiadm", "logout_success"))]
    ini.detach("sr1", state)
    replay.done()


def test_a_target_two_srs_use_is_logged_out_after_the_second(tmp_path: Path) -> None:
    sysfs = str(fake_sysfs(tmp_path / "sys"))
    spec = LunSpec(((PORTAL.split(":")[0], 3260),), LUN1, LUN2_ID)
    second_login = login_script()
    second_login[2] = (second_login[2][0], load("iscsiadm", "login_already_logged_in"))
    replay = Replay([*login_script(), *disks_script(), *second_login, *disks_script()])
    ini = KernelInitiator(tmp_path / "run", replay, sysfs=sysfs)
    s1 = ini.attach("sr1", spec, tmp_path / "s1")
    s2 = ini.attach("sr2", spec, tmp_path / "s2")  # login exit 15: already logged in
    replay.done()
    ini.detach("sr1", s1)  # sr2 still uses the target: no logout
    replay.done()
    replay.script += [(["iscsiadm", "-m", "node", "-T", LUN1, "-p", PORTAL, "-u"],
                       load("iscsiadm", "logout_success"))]
    ini.detach("sr2", s2)
    replay.done()


def test_check_notices_a_lost_session(tmp_path: Path) -> None:
    import pytest
    from smcommon.errors import BackendError

    replay = Replay([(["iscsiadm", "-m", "session"], load("iscsiadm", "session_none"))])
    ini = KernelInitiator(tmp_path / "run", replay)
    spec = LunSpec((("10.251.77.2", 3260),), LUN1, LUN2_ID)
    with pytest.raises(BackendError) as exc:
        ini.check(spec, {"iqn": LUN1, "portals": [PORTAL]})
    assert exc.value.code == "ISCSI_SESSION_LOST"
