from __future__ import annotations

from pathlib import Path

import pytest
from smcommon.errors import InvalidRequest
from smcommon.paths import Paths, log_file_from_env, safe_name


def test_paths_derive_from_sm_root(sm_root: Path) -> None:
    p = Paths.from_env()
    assert p.root == sm_root
    for sub in (p.run_dir, p.state_dir, p.lock_dir, p.log_file, p.sr_mount("abc")):
        assert sub.is_relative_to(sm_root)
    assert p.sr_mount("abc") == sm_root / "run/sm/sr-mount/abc"


def test_default_root_is_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SM_ROOT", raising=False)
    assert Paths.from_env().run_dir == Path("/run/sm")
    assert Paths.from_env().state_dir == Path("/var/lib/sm")
    assert log_file_from_env() == "/var/log/sm/sm.log" == str(Paths.from_env().log_file)


@pytest.mark.parametrize("root", ["/tmp/r", "/tmp/r/", "rel/r", ""])
def test_the_log_file_is_the_same_made_without_pathlib(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SM_ROOT", root)
    assert Path(log_file_from_env()) == Paths.from_env().log_file
    assert Paths.from_env().log_dir == Paths.from_env().log_file.parent


@pytest.mark.parametrize(
    "name", ["0c3f9a1e-7d7b-4b0e-9f1a-2f0e1b3c4d5e", "sr1", "a.b_c:d-e", "x" * 128]
)
def test_safe_names_pass(name: str) -> None:
    assert safe_name("vdi", name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", ".", "../etc", "/etc/passwd", "a/b", "a\x00b", "x" * 129, "-rf", ".hidden", "a b", 5, None],
)
def test_hostile_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        safe_name("vdi", name)
    assert "vdi" in str(info.value)
