"""smcommon.iscsi (iscsiadm) against real open-iscsi outputs (tests/data/captures/
iscsiadm, taken with the kernel initiator against tgtd), replayed by a fake
runner that checks each argv exactly.  This kernel has no iSCSI initiator: the
captures are how the iscsiadm path is tested here."""

from __future__ import annotations

from pathlib import Path

import pytest
from replay import Replay, load
from smcommon.iscsi import (
    ISCSI_ERR_LOGIN_AUTH_FAILED,
    ISCSI_ERR_NO_OBJS_FOUND,
    ISCSI_ERR_SESS_EXISTS,
    Iscsiadm,
    IscsiError,
    TargetUsers,
    parse_disks,
)

PORTAL = "10.251.77.2:3260"
LUN1 = "iqn.2026-11.test.storage:lun1"
CHAP = "iqn.2026-11.test.storage:chap"
SECRET = "chapsecret12"  # the captures' throwaway secret


def adm(*script: tuple[list[str], str]) -> tuple[Iscsiadm, Replay]:
    replay = Replay([(["iscsiadm", *argv], load("iscsiadm", case)) for argv, case in script])
    return Iscsiadm(replay), replay


def test_sendtargets_discovery() -> None:
    a, replay = adm((["-m", "discovery", "-t", "sendtargets", "-p", PORTAL],
                     "discovery_sendtargets"))
    targets = a.discover(PORTAL)
    replay.done()
    assert [(t.portal, t.tpgt, t.iqn) for t in targets] == [
        (PORTAL, 1, LUN1), (PORTAL, 1, CHAP)]
    assert replay.calls[0]["timeout"] > 0


def test_discovery_against_a_closed_port() -> None:
    portal = "10.251.77.2:3261"
    a, _ = adm((["-m", "discovery", "-t", "sendtargets", "-p", portal],
                "discovery_sendtargets_closed_port"))
    with pytest.raises(IscsiError) as exc:
        a.discover(portal)
    assert exc.value.code == "ISCSI_UNREACHABLE"  # exit 11, ISCSI_ERR_PDU_TIMEOUT
    assert "PDU timed out" in exc.value.details[1]


def test_login_is_idempotent_and_logout_of_nothing_is_fine() -> None:
    node = ["-m", "node", "-T", LUN1, "-p", PORTAL]
    a, replay = adm(
        ([*node, "-l"], "login_success"),
        ([*node, "-l"], "login_already_logged_in"),
        ([*node, "-u"], "logout_success"),
        ([*node, "-u"], "logout_not_logged_in"),
    )
    assert a.login(LUN1, PORTAL) is True
    assert a.login(LUN1, PORTAL) is False  # exit 15: already logged in
    assert a.logout(LUN1, PORTAL) is True
    assert a.logout(LUN1, PORTAL) is False  # exit 21: no session
    replay.done()
    assert load("iscsiadm", "login_already_logged_in").exit == ISCSI_ERR_SESS_EXISTS
    assert load("iscsiadm", "logout_not_logged_in").exit == ISCSI_ERR_NO_OBJS_FOUND


def test_chap_goes_on_the_node_record_and_the_secret_never_shows() -> None:
    node = ["-m", "node", "-T", CHAP, "-p", PORTAL, "--op", "update", "-n"]
    a, replay = adm(
        (["-m", "node", "-o", "new", "-T", CHAP, "-p", PORTAL], "node_new_chap"),
        ([*node, "node.session.auth.authmethod", "-v", "CHAP"], "node_update_authmethod_chap"),
        ([*node, "node.session.auth.username", "-v", "chapuser"], "node_update_username"),
        ([*node, "node.session.auth.password", "-v", SECRET], "node_update_password"),
        (["-m", "node", "-T", CHAP, "-p", PORTAL, "-l"], "login_wrong_chap_password"),
    )
    a.node_new(CHAP, PORTAL)
    a.set_chap(CHAP, PORTAL, "chapuser", SECRET)
    with pytest.raises(IscsiError) as exc:
        a.login(CHAP, PORTAL)
    replay.done()
    assert exc.value.code == "ISCSI_CHAP_FAILED"
    assert load("iscsiadm", "login_wrong_chap_password").exit == ISCSI_ERR_LOGIN_AUTH_FAILED
    assert SECRET not in str(exc.value)
    # the password update was run with the secret to mask
    (pw_call,) = [c for c in replay.calls if "node.session.auth.password" in c["argv"]]
    assert pw_call["secrets"] == (SECRET,)


def test_a_failing_update_masks_the_secret() -> None:
    """If iscsiadm fails on the password update, the error shows ******."""
    from replay import synthetic

    fail = synthetic(6, "", f"iscsiadm: cannot update {SECRET}\n")  # not captured
    replay = Replay([(["iscsiadm", "-m", "node", "-T", CHAP, "-p", PORTAL, "--op", "update",
                       "-n", "node.session.auth.password", "-v", SECRET], fail)])
    with pytest.raises(IscsiError) as exc:
        Iscsiadm(replay).node_update(CHAP, PORTAL, "node.session.auth.password", SECRET,
                                     secret=True)
    assert SECRET not in str(exc.value) and "******" in str(exc.value)


def test_login_to_a_missing_target_and_a_silent_portal() -> None:
    node = ["-m", "node", "-T", "iqn.2026-11.test.storage:nonexistent", "-p", PORTAL, "-l"]
    a, _ = adm((node, "login_nonexistent_target"))
    with pytest.raises(IscsiError) as exc:
        a.login("iqn.2026-11.test.storage:nonexistent", PORTAL)
    assert exc.value.code == "ISCSI_LOGIN_FAILED"  # exit 19
    a, _ = adm((["-m", "node", "-T", LUN1, "-p", PORTAL, "-l"], "login_blackholed"))
    with pytest.raises(IscsiError) as exc:
        a.login(LUN1, PORTAL)
    assert exc.value.code == "ISCSI_TIMEOUT"  # exit 8 after 122 s there


def test_sessions_and_their_disks() -> None:
    a, replay = adm(
        (["-m", "session"], "session"),
        (["-m", "session", "-r", "4", "-P", "3"], "session_r_sid_P3"),
        (["-m", "session"], "session_none"),
    )
    (s,) = a.sessions()
    assert (s.sid, s.portal, s.tpgt, s.iqn) == (4, PORTAL, 1, LUN1)
    disks = a.session_disks(4)
    assert [(d.lun, d.name, d.state) for d in disks] == [(1, "sda", "running"),
                                                         (2, "sdb", "running")]
    assert a.sessions() == []  # exit 21: no session
    replay.done()


def test_node_delete_is_idempotent() -> None:
    argv = ["-m", "node", "-o", "delete", "-T", LUN1, "-p", PORTAL]
    a, replay = adm((argv, "node_delete"), (argv, "node_delete_again"))
    a.node_delete(LUN1, PORTAL)
    a.node_delete(LUN1, PORTAL)
    replay.done()


def test_parse_disks_skips_luns_without_a_disk() -> None:
    assert parse_disks("scsi2 Channel 00 Id 0 Lun: 0\n") == []


def test_a_target_is_logged_out_when_its_last_sr_is_done(tmp_path: Path) -> None:
    users = TargetUsers(tmp_path)
    assert users.add(LUN1, PORTAL, "sr1") == []
    assert users.add(LUN1, PORTAL, "sr2") == ["sr1"]
    assert users.add(LUN1, PORTAL, "sr2") == ["sr1", "sr2"]
    assert users.remove(LUN1, PORTAL, "sr1") == ["sr2"]  # still used: stay logged in
    assert users.remove(LUN1, PORTAL, "sr2") == []  # the last one: log out
    assert list((tmp_path / "iscsi").glob("*.json")) == []
