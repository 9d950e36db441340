"""Unit tests of the lvmoiscsi parts: makes ``replay`` (beside this file) and the
capture loader ``captures`` (tests/unit/storage) importable under pytest's
importlib import mode."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent / "storage")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
