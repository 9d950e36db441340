"""Datapath operations through the engine: the automaton's rules, and only
changes of a VDI's effective state reach the store."""

from __future__ import annotations

import pytest
from engine_helpers import MiB
from smcommon.engine import vdipath
from smcommon.engine.sr import SrEngine
from smcommon.errors import BackendError, IllegalTransition, VdiDoesNotExist


@pytest.fixture
def calls(eng: SrEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    seen: list[tuple[str, object]] = []
    real_activate, real_deactivate = eng.store.activate, eng.store.deactivate

    def activate(volume: str, rw: bool) -> None:
        seen.append(("activate", rw))
        real_activate(volume, rw)

    def deactivate(volume: str) -> None:
        seen.append(("deactivate", None))
        real_deactivate(volume)

    monkeypatch.setattr(eng.store, "activate", activate)
    monkeypatch.setattr(eng.store, "deactivate", deactivate)
    return seen


def test_lifecycle_and_backend_changes(
    eng: SrEngine, calls: list[tuple[str, object]]
) -> None:
    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    with pytest.raises(IllegalTransition) as e:
        vdipath.activate(eng, "a", v)
    assert e.value.from_state == "Detached"
    info = vdipath.attach(eng, "a", v, False)
    assert info["params"] == eng.store.path(v) and info["xenstore_data"]["mode"] == "r"
    vdipath.attach(eng, "a", v, False)  # no-op
    vdipath.activate(eng, "a", v)
    assert calls == [("activate", False)]
    vdipath.attach(eng, "b", v, True)  # effective Activated(RW): an upgrade
    assert calls[-1] == ("activate", True)
    with pytest.raises(BackendError, match="RO_OVER_RW"):
        vdipath.attach(eng, "b", v, False)
    vdipath.activate(eng, "b", v)  # already effective: nothing reaches the store
    n = len(calls)
    vdipath.deactivate(eng, "a", v)
    assert len(calls) == n  # b still activated
    with pytest.raises(IllegalTransition):
        vdipath.detach(eng, "b", v)
    vdipath.deactivate(eng, "b", v)
    assert calls[-1] == ("deactivate", None)
    vdipath.detach(eng, "a", v)
    vdipath.detach(eng, "b", v)
    vdipath.detach(eng, "b", v)  # no-op
    assert eng.dps.states(v) == {}


def test_state_survives_a_new_process(eng: SrEngine) -> None:
    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    vdipath.attach(eng, "a", v, True)
    vdipath.activate(eng, "a", v)
    again = SrEngine(eng.paths, eng.sr, eng.sr_dir)
    assert again.dps.states(v)["a"].value == "Activated(RW)"
    assert vdipath.release_all(again) == [f"{v}/a"]
    assert again.dps.active_vdis() == []


def test_unknown_vdi(eng: SrEngine) -> None:
    with pytest.raises(VdiDoesNotExist):
        vdipath.attach(eng, "a", "missing", True)


def test_missing_leaf_is_reported(eng: SrEngine) -> None:
    v = eng.create({"name_label": "d", "virtual_size": 4 * MiB})["vdi"]
    eng.store.remove(v)
    with pytest.raises(BackendError, match="VHD_MISSING"):
        vdipath.attach(eng, "a", v, True)
    assert eng.dps.states(v) == {}
