"""Unit tests of smcommon.engine.datapath: the automaton, effective state, files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from smcommon.engine import datapath
from smcommon.engine.datapath import (
    Datapaths,
    DpState,
    Transition,
    effective_of,
    next_state,
)
from smcommon.errors import BackendError, IllegalTransition, InvalidRequest, to_wire

D, ARO, ARW, XRO, XRW = (
    DpState.DETACHED,
    DpState.ATTACHED_RO,
    DpState.ATTACHED_RW,
    DpState.ACTIVATED_RO,
    DpState.ACTIVATED_RW,
)

# (from, op, read_write) -> expected new state, or an exception class.
TABLE: list[tuple[DpState, str, bool | None, DpState | type[Exception]]] = [
    # attach
    (D, "attach", False, ARO),
    (D, "attach", True, ARW),
    (ARO, "attach", False, ARO),  # repeat: no-op
    (ARO, "attach", True, ARW),  # RW over RO upgrades
    (ARW, "attach", True, ARW),  # repeat: no-op
    (ARW, "attach", False, BackendError),  # RO over RW refused
    (XRO, "attach", False, XRO),
    (XRO, "attach", True, XRW),
    (XRW, "attach", True, XRW),
    (XRW, "attach", False, BackendError),
    # activate
    (D, "activate", None, IllegalTransition),
    (ARO, "activate", None, XRO),
    (ARW, "activate", None, XRW),
    (XRO, "activate", None, XRO),
    (XRW, "activate", None, XRW),
    # deactivate
    (D, "deactivate", None, D),
    (ARO, "deactivate", None, ARO),
    (ARW, "deactivate", None, ARW),
    (XRO, "deactivate", None, ARO),
    (XRW, "deactivate", None, ARW),
    # detach
    (D, "detach", None, D),
    (ARO, "detach", None, D),
    (ARW, "detach", None, D),
    (XRO, "detach", None, IllegalTransition),
    (XRW, "detach", None, IllegalTransition),
]

# The ops that bring a fresh datapath to each state.
PATH_TO: dict[DpState, list[tuple[str, bool | None]]] = {
    D: [],
    ARO: [("attach", False)],
    ARW: [("attach", True)],
    XRO: [("attach", False), ("activate", None)],
    XRW: [("attach", True), ("activate", None)],
}


def drive(
    dps: Datapaths, vdi: str, dp: str, ops: list[tuple[str, bool | None]]
) -> None:
    for op, rw in ops:
        dps.commit(dps.plan(vdi, dp, op, rw))


@pytest.fixture
def dps(tmp_path: Path) -> Datapaths:
    return Datapaths(tmp_path / "dp")


def test_table_covers_every_state_and_op() -> None:
    seen = {(s, op, rw) for s, op, rw, _ in TABLE}
    for s in DpState:
        for op in ("activate", "deactivate", "detach"):
            assert (s, op, None) in seen
        for rw in (False, True):
            assert (s, "attach", rw) in seen


@pytest.mark.parametrize(("old", "op", "rw", "want"), TABLE)
def test_next_state(old: DpState, op: str, rw: bool | None, want: object) -> None:
    if isinstance(want, DpState):
        assert next_state(old, op, rw) is want
    else:
        assert isinstance(want, type)
        with pytest.raises(want):
            next_state(old, op, rw)


@pytest.mark.parametrize(("old", "op", "rw", "want"), TABLE)
def test_plan_and_commit_single_dp(
    dps: Datapaths, old: DpState, op: str, rw: bool | None, want: object
) -> None:
    drive(dps, "v1", "dp0", PATH_TO[old])
    assert dps.states("v1").get("dp0", D) is old
    if not isinstance(want, DpState):
        assert isinstance(want, type)
        with pytest.raises(want):
            dps.plan("v1", "dp0", op, rw)
        # a refused plan changes nothing
        assert dps.states("v1").get("dp0", D) is old
        return
    t = dps.plan("v1", "dp0", op, rw)
    assert (t.vdi, t.dp, t.old, t.new) == ("v1", "dp0", old, want)
    # with one datapath, the effective state is that datapath's state
    assert (t.old_effective, t.new_effective) == (old, want)
    assert t.effective_changed == (old is not want)
    # plan is pure: nothing recorded until commit
    assert dps.states("v1").get("dp0", D) is old
    dps.commit(t)
    assert dps.states("v1").get("dp0", D) is want
    assert dps.effective("v1") is want


def test_illegal_transition_names_the_states() -> None:
    with pytest.raises(IllegalTransition) as e:
        next_state(XRW, "detach")
    assert to_wire(e.value) == ["Illegal_transition", "Activated(RW)", "Detached"]
    with pytest.raises(IllegalTransition) as e:
        next_state(D, "activate")
    assert to_wire(e.value) == ["Illegal_transition", "Detached", "Activated(RO)"]


def test_ro_over_rw_is_a_backend_error() -> None:
    with pytest.raises(BackendError) as e:
        next_state(ARW, "attach", False)
    wire = to_wire(e.value)
    assert wire[:2] == ["Backend_error", "DATAPATH_RO_OVER_RW"]
    assert "Attached(RW)" in wire[2]


def test_bad_op_and_missing_mode(dps: Datapaths) -> None:
    with pytest.raises(InvalidRequest, match="unknown datapath operation"):
        dps.plan("v1", "dp0", "explode")
    with pytest.raises(InvalidRequest, match="read_write"):
        dps.plan("v1", "dp0", "attach")


@pytest.mark.parametrize(
    "vdi", ["../x", "/etc", "a\x00b", "x" * 300, "", ".hidden", "a/b"]
)
def test_hostile_vdi_names_never_reach_a_path(
    dps: Datapaths, tmp_path: Path, vdi: str
) -> None:
    with pytest.raises(InvalidRequest):
        dps.plan(vdi, "dp0", "attach", True)
    with pytest.raises(InvalidRequest):
        dps.forget(vdi)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dp", ["", "a\x00b", "d" * 2000])
def test_bad_dp_names(dps: Datapaths, dp: str) -> None:
    with pytest.raises(InvalidRequest):
        dps.plan("v1", dp, "attach", True)


def test_dp_names_are_free_text(dps: Datapaths) -> None:
    drive(dps, "v1", "vbd/3/xvda", [("attach", True)])
    drive(dps, "v1", "../../etc/passwd", [("attach", False)])
    assert dps.states("v1") == {"vbd/3/xvda": ARW, "../../etc/passwd": ARO}
    assert sorted(p.name for p in dps.state_dir.iterdir()) == ["v1.json"]


def test_order_and_effective() -> None:
    assert sorted([XRW, D, ARW, XRO, ARO]) == [D, ARO, ARW, XRO, XRW]
    assert max(ARW, XRO) is XRO
    assert effective_of(()) is D
    assert effective_of((ARO, ARO)) is ARO
    assert effective_of((ARO, ARW)) is ARW
    assert effective_of((XRO, ARO)) is XRO
    # activation and rw-ness both preserved
    assert effective_of((XRO, ARW)) is XRW
    assert effective_of((D, XRW, ARO)) is XRW
    # whenever the modes agree, effective is the plain max
    for a in DpState:
        for b in DpState:
            if a.read_write == b.read_write or D in (a, b):
                assert effective_of((a, b)) is max(a, b)


def test_several_dps_effective_changes_only_at_the_edges(dps: Datapaths) -> None:
    t = dps.plan("v1", "a", "attach", False)
    assert t.effective_changed and t.new_effective is ARO
    dps.commit(t)
    t = dps.plan("v1", "b", "attach", False)
    assert not t.effective_changed  # second RO user: backend untouched
    dps.commit(t)
    t = dps.plan("v1", "b", "attach", True)
    assert t.effective_changed and (t.old_effective, t.new_effective) == (ARO, ARW)
    dps.commit(t)
    t = dps.plan("v1", "a", "activate")
    assert t.effective_changed and t.new_effective is XRW  # a activated, b rw
    dps.commit(t)
    assert dps.states("v1") == {"a": XRO, "b": ARW}
    # b may detach; a keeps the VDI activated but only RO now
    t = dps.plan("v1", "b", "detach")
    assert (t.old_effective, t.new_effective) == (XRW, XRO)
    dps.commit(t)
    # a detach of an activated dp is illegal even with other dps around
    with pytest.raises(IllegalTransition):
        dps.plan("v1", "a", "detach")
    drive(dps, "v1", "a", [("deactivate", None)])
    t = dps.plan("v1", "a", "detach")
    assert t.effective_changed and t.new_effective is D
    dps.commit(t)
    assert dps.states("v1") == {}
    assert dps.active_vdis() == []
    # the last dp going Detached removes the file
    assert list(dps.state_dir.iterdir()) == []


def test_vdis_are_independent(dps: Datapaths) -> None:
    drive(dps, "v1", "dp", PATH_TO[XRW])
    drive(dps, "v2", "dp", PATH_TO[ARO])
    drive(dps, "v3", "dp", [("attach", True), ("detach", None)])
    assert dps.active_vdis() == ["v1", "v2"]
    assert dps.effective("v1") is XRW
    assert dps.effective("v2") is ARO
    assert dps.effective("v3") is D
    dps.forget("v1")
    assert dps.active_vdis() == ["v2"]
    assert dps.states("v1") == {}
    dps.forget("v1")  # idempotent
    dps.forget("never")


def test_persistence_across_instances(tmp_path: Path) -> None:
    a = Datapaths(tmp_path / "dp")
    drive(a, "v1", "dp1", PATH_TO[XRO])
    drive(a, "v1", "dp2", PATH_TO[ARW])
    b = Datapaths(tmp_path / "dp")
    assert b.states("v1") == {"dp1": XRO, "dp2": ARW}
    assert b.effective("v1") is XRW
    assert b.active_vdis() == ["v1"]
    doc = json.loads((tmp_path / "dp" / "v1.json").read_text())
    assert doc["dps"] == {"dp1": "Activated(RO)", "dp2": "Attached(RW)"}


def test_empty_or_missing_state_dir(tmp_path: Path) -> None:
    dps = Datapaths(tmp_path / "nowhere")
    assert dps.active_vdis() == []
    assert dps.states("v1") == {}
    assert dps.effective("v1") is D
    t = dps.plan("v1", "dp", "detach")
    assert t.noop and not t.effective_changed
    dps.commit(t)  # a no-op commit creates nothing
    assert not (tmp_path / "nowhere").exists()


def test_stale_plan_is_refused(dps: Datapaths) -> None:
    t1 = dps.plan("v1", "dp", "attach", True)
    t2 = dps.plan("v1", "dp", "attach", False)
    dps.commit(t1)
    with pytest.raises(BackendError, match="DATAPATH_STATE_CHANGED"):
        dps.commit(t2)
    assert dps.states("v1") == {"dp": ARW}


def test_commit_of_a_hand_made_transition(dps: Datapaths) -> None:
    dps.commit(Transition("v1", "dp", D, ARW, D, ARW))
    assert dps.states("v1") == {"dp": ARW}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"dps": []}',
        b'{"dps": {"dp": "Flying"}}',
        b'"x"',
        b"\xff\xfe",
    ],
)
def test_corrupt_state_file_is_a_clear_backend_error(
    dps: Datapaths, content: bytes
) -> None:
    dps.state_dir.mkdir(parents=True)
    (dps.state_dir / "v1.json").write_bytes(content)
    with pytest.raises(BackendError) as e:
        dps.states("v1")
    wire = to_wire(e.value)
    assert wire[:2] == ["Backend_error", "DATAPATH_STATE_CORRUPT"]
    assert "v1.json" in wire[2]


def test_leftover_temp_files_are_ignored(dps: Datapaths) -> None:
    drive(dps, "v1", "dp", PATH_TO[ARO])
    (dps.state_dir / ".v2.json.123.tmp").write_text("{half")
    (dps.state_dir / "notes.txt").write_text("x")
    assert dps.active_vdis() == ["v1"]


def test_failed_write_keeps_the_old_file(
    dps: Datapaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    drive(dps, "v1", "dp", PATH_TO[ARO])
    before = (dps.state_dir / "v1.json").read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datapath.os, "fsync", boom)
    with pytest.raises(OSError):
        dps.commit(dps.plan("v1", "dp", "activate"))
    monkeypatch.undo()
    assert (dps.state_dir / "v1.json").read_bytes() == before
    assert sorted(p.name for p in dps.state_dir.iterdir()) == ["v1.json"]
    assert dps.states("v1") == {"dp": ARO}


def test_atomic_write_uses_rename(
    dps: Datapaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        calls.append((os.fspath(src), os.fspath(dst)))
        real(src, dst)

    monkeypatch.setattr(datapath.os, "replace", spy)
    drive(dps, "v1", "dp", PATH_TO[ARW])
    assert len(calls) == 1
    src, dst = calls[0]
    assert Path(src).parent == Path(dst).parent == dps.state_dir
    assert Path(dst).name == "v1.json"


_CHURN = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from smcommon.engine.datapath import Datapaths
dps = Datapaths(Path(sys.argv[1]))
cycle = [("attach", True), ("activate", None), ("deactivate", None), ("detach", None)]
print("ready", flush=True)
while True:
    for i in range(4):
        for op, rw in cycle:
            dps.commit(dps.plan("v1", f"dp{i}", op, rw))
        dps.commit(dps.plan("v1", f"dp{i}", "attach", False))
"""


def test_kill_9_mid_write_leaves_a_readable_state(tmp_path: Path) -> None:
    """A process killed at random instants while committing: every state file
    that exists afterwards parses and holds only valid states."""
    lib = Path(datapath.__file__).resolve().parents[2]
    state = tmp_path / "dp"
    for delay_ms in (3, 7, 11, 17, 23, 31, 43, 59):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHURN, str(state), str(lib)], stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(delay_ms / 1000)
        finally:
            proc.kill()
            proc.wait()
        dps = Datapaths(state)
        states = dps.states("v1")  # must not raise
        assert set(states) <= {"dp0", "dp1", "dp2", "dp3"}
        assert all(isinstance(s, DpState) for s in states.values())
        # the next process carries on from what is recorded
        for dp in list(states):
            drive(dps, "v1", dp, [("deactivate", None), ("detach", None)])
        assert dps.states("v1") == {}


def test_state_files_on_a_fake_fs(fs: object) -> None:
    """pyfakefs: the exact files written, and nothing else, at each step."""
    state = Path("/run/sm/dp/sr1")
    dps = Datapaths(state)
    drive(dps, "v1", "vbd/1/xvda", PATH_TO[XRW])
    drive(dps, "v2", "dp", PATH_TO[ARO])
    assert sorted(os.listdir(state)) == ["v1.json", "v2.json"]
    doc = json.loads((state / "v1.json").read_text())
    assert doc == {"format": 1, "vdi": "v1", "dps": {"vbd/1/xvda": "Activated(RW)"}}
    drive(dps, "v2", "dp", [("detach", None)])
    assert os.listdir(state) == ["v1.json"]
    dps.forget("v1")
    assert os.listdir(state) == []
    assert not os.path.exists("/run/sm/dp/sr1/.v1.json.tmp")
