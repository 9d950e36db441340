"""The VHD library: fixed, dynamic and differencing images and their chains.

Public API (docs/design.md): functions over image paths; every error is a
``VhdError`` with a stable ``code``.  Modules: ``format`` (on-disk structures),
``reader`` and ``image`` (open/read, write over a chain), ``parents`` (the
parent search), ``layout`` (where metadata and blocks lie, libvhd's rules),
``batmap`` (blktap's map of full blocks), ``create`` (new images), ``ops``
(operations), ``relayout`` (moving metadata crash-safely), ``check`` and
``repair``, ``transfer`` (raw import/export, convert), ``locks``, ``info``,
``errors``, ``cli`` (the ``vhd`` command).

Rules every function keeps:
- One writer per image: an flock, exclusive to write and shared to read, held
  from open to close (coalesce releases the parent's between batches); a wait
  longer than ``locks.LOCK_TIMEOUT`` raises ``Busy``.
- Parents are found from the child's locators (W2RU first, relative to the
  child's directory) and only inside the allowed roots: by default each
  child's own directory; the internal keyword ``search_dirs`` widens that.
- A write is durable when it returns; a process killed at any instant leaves
  an image that ``check`` (libvhd's rules) accepts and that holds every
  acknowledged byte.
- Dynamic and differencing images carry blktap's batmap, kept right by every
  operation, so tapdisk (libvhd) opens every image the library writes.
- New images appear whole or not at all (O_TMPFILE, linked when complete).
"""

from __future__ import annotations

from smcommon.vhd.check import check
from smcommon.vhd.create import create, snapshot
from smcommon.vhd.errors import (
    AlreadyExists,
    Busy,
    ChainTooDeep,
    Corrupt,
    DataBeyondEnd,
    InvalidArgument,
    NoSpace,
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
from smcommon.vhd.repair import repair
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
    "NoSpace",
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
