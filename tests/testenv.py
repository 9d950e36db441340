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


def child_pids() -> set[int]:
    """This test process's live descendants (session fixtures' servers among them)."""
    import psutil

    out = set()
    for c in psutil.Process().children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                out.add(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def new_children(before: set[int]) -> set[int]:
    """Descendants alive now that were not before: what a test left behind."""
    return child_pids() - before
