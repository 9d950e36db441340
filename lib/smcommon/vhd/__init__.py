"""The VHD library: fixed, dynamic and differencing images and their chains.

Public API (docs/design.md): functions over image paths; every error is a
``VhdError`` with a stable ``code``.  Modules: ``format`` (on-disk structures),
``image`` (open/read/write over a chain), ``create`` (new images), ``ops``
(operations), ``check`` (check/repair), ``transfer`` (raw import/export,
convert), ``cli`` (the ``vhd`` command).
"""

from __future__ import annotations

from smcommon.vhd.create import create, snapshot
from smcommon.vhd.errors import (
    AlreadyExists,
    ChainTooDeep,
    Corrupt,
    DataBeyondEnd,
    InvalidArgument,
    NotFound,
    ParentLoop,
    ParentMismatch,
    ParentMissing,
    ParentNotAllowed,
    ReadOnly,
    TooLarge,
    Unsupported,
    VhdError,
    VhdIOError,
)
from smcommon.vhd.format import BLOCK_SIZE, MAX_VIRTUAL_SIZE
from smcommon.vhd.image import Image, Info
from smcommon.vhd.ops import chain, info, read, set_hidden, write

__all__ = [
    "BLOCK_SIZE", "MAX_VIRTUAL_SIZE", "Info", "Image",
    "create", "snapshot", "info", "chain", "read", "write", "set_hidden",
    "VhdError", "NotFound", "AlreadyExists", "InvalidArgument", "TooLarge", "Corrupt",
    "Unsupported", "ParentMissing", "ParentMismatch", "ParentNotAllowed", "ParentLoop",
    "ChainTooDeep", "DataBeyondEnd", "ReadOnly", "VhdIOError",
]
