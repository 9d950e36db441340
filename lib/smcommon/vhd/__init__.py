"""The VHD library: fixed, dynamic and differencing images and their chains.

Public API (docs/design.md): functions over image paths; every error is a
``VhdError`` with a stable ``code``.  Modules: ``format`` (on-disk structures),
``image`` (open/read/write over a chain), ``create`` (new images), ``ops``
(operations), ``check`` (check/repair), ``transfer`` (raw import/export,
convert), ``cli`` (the ``vhd`` command).
"""

from __future__ import annotations

from smcommon.vhd.check import check, repair
from smcommon.vhd.create import create, snapshot
from smcommon.vhd.errors import (
    AlreadyExists,
    Busy,
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
from smcommon.vhd.image import Image
from smcommon.vhd.info import Info
from smcommon.vhd.ops import (
    allocation_map,
    chain,
    coalesce,
    info,
    read,
    resize,
    set_hidden,
    set_parent,
    write,
)
from smcommon.vhd.transfer import convert, export_raw, import_raw

__all__ = [
    "BLOCK_SIZE",
    "MAX_VIRTUAL_SIZE",
    "AlreadyExists",
    "Busy",
    "ChainTooDeep",
    "Corrupt",
    "DataBeyondEnd",
    "Image",
    "Info",
    "InvalidArgument",
    "NotFound",
    "ParentLoop",
    "ParentMismatch",
    "ParentMissing",
    "ParentNotAllowed",
    "ReadOnly",
    "TooLarge",
    "Unsupported",
    "VhdError",
    "VhdIOError",
    "allocation_map",
    "chain",
    "check",
    "coalesce",
    "convert",
    "create",
    "export_raw",
    "import_raw",
    "info",
    "read",
    "repair",
    "resize",
    "set_hidden",
    "set_parent",
    "snapshot",
    "write",
]
