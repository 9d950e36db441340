"""Shared set-up of the VHD proof tests: makes ``vhdproof`` (the helpers beside
this file) importable under pytest's importlib import mode, and gives each test
a scratch directory that plays the role of one SR's directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture
def sr_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sr"
    d.mkdir()
    return d
