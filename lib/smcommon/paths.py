"""Every host path the storage manager uses, derived from one root.

The root is ``$SM_ROOT`` when set (tests use a tmp_path, the README's main job
uses the project's ``.state/``), else ``/``: then the paths are the standard
system places (``/run/sm``, ``/var/lib/sm``, ``/var/log/sm``, ``/etc/sm``).

Names that come from requests (an SR or VDI key) go through ``safe_name``
before they touch a path, so no request can name a path outside its place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from smcommon.errors import InvalidRequest

ROOT_ENV = "SM_ROOT"
LOG_FILE = "var/log/sm/sm.log"  # under the root
MAX_NAME = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def log_file_from_env() -> str:
    """``Paths.from_env().log_file``, as a str made without pathlib: each
    plugin call starts with it, and a warm call's first use of pathlib
    copied ~35 pages more (dispatcher/zygote.py)."""
    return os.path.join(os.environ.get(ROOT_ENV) or "/", LOG_FILE)


def safe_name(kind: str, name: object) -> str:
    """Return ``name`` if it can be a single path component, else raise.

    Allowed: letters, digits, ``.``, ``_``, ``:``, ``-``; not starting with a
    dot or dash; at most MAX_NAME characters.  So no ``/``, no ``..``, no NUL.
    """
    if not isinstance(name, str):
        raise InvalidRequest(f"{kind} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidRequest(f"{kind} must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidRequest(f"{kind} is longer than {MAX_NAME} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"{kind} {name!r} may hold only letters, digits and . _ : - "
            "and must start with a letter or digit"
        )
    return name


class Paths:
    """Host paths under one root.  A plain class: the plugins build one per call,
    and importing dataclasses would cost every call ~10 ms.  ``root`` is made
    a Path on first use: a call that uses none (Query.query) does not start
    pathlib, which in a warm call copied ~25 pages (dispatcher/zygote.py)."""

    __slots__ = ("_given", "_root")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._given = root
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(self._given)
        return self._root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Paths) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"Paths({str(self.root)!r})"

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> Paths:
        return cls(root or os.environ.get(ROOT_ENV) or "/")

    @property
    def run_dir(self) -> Path:
        """Volatile host state: locks, mounts, datapaths of this boot."""
        return self.root / "run" / "sm"

    @property
    def state_dir(self) -> Path:
        """Persistent host state: which SRs this host knows."""
        return self.root / "var" / "lib" / "sm"

    @property
    def etc_dir(self) -> Path:
        """Host configuration: ``pool.json`` (this host's TLS identity, the
        clients it lets in, the peers it copies to; ``smcommon.pool``)."""
        return self.root / "etc" / "sm"

    @property
    def lock_dir(self) -> Path:
        return self.run_dir / "lock"

    @property
    def log_dir(self) -> Path:
        return self.log_file.parent

    @property
    def log_file(self) -> Path:
        return self.root / LOG_FILE

    def sr_mount(self, sr: str) -> Path:
        return self.run_dir / "sr-mount" / safe_name("sr", sr)
