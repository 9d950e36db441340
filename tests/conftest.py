"""Fixtures shared by every test.

``sm_root`` points SM_ROOT (every host path of the storage manager) at a fresh
tmp directory, so no test touches /run, /var/lib or /var/log of the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sm_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "smroot"
    root.mkdir()
    monkeypatch.setenv("SM_ROOT", str(root))
    return root


@pytest.fixture
def repo() -> Path:
    return REPO
