"""Fixtures of the engine unit tests: an SR in a tmp directory, real VHD images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_helpers import SR, inline_gc
from smcommon.engine.meta import Metadata
from smcommon.engine.sr import SrEngine
from smcommon.paths import Paths


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "root")


@pytest.fixture
def sr_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sr"
    d.mkdir()
    Metadata(d).write_sr({"sr": SR, "type": "ext", "format": 1})
    return d


@pytest.fixture
def eng(paths: Paths, sr_dir: Path) -> SrEngine:
    return SrEngine(paths, SR, sr_dir, collect=inline_gc)
