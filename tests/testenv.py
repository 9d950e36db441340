"""What every test may rely on about its environment (see tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CI_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the PATH of a fresh machine's CI


def venv_script(name: str) -> Path:
    """An entry point of the installed package (``smctl``, ``vhd`` ...), found
    beside the interpreter, not through PATH."""
    return Path(sys.executable).parent / name
