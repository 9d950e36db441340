"""The errors of the VHD library: every failure of ``smcommon.vhd`` is a VhdError.

    smcommon.errors.Error
     +-- VhdError               VHD_ERROR: root of this tree
          +-- NotFound          VHD_NOT_FOUND: the image (or a file named) does not exist
          +-- AlreadyExists     VHD_EXISTS: refusing to overwrite an existing file
          +-- InvalidArgument   VHD_INVALID_ARGUMENT: a bad size, offset, length, option
          +-- TooLarge          VHD_TOO_LARGE: a size above MAX_VIRTUAL_SIZE
          +-- Corrupt           VHD_CORRUPT: the image breaks a structural rule (named)
          +-- Unsupported       VHD_UNSUPPORTED: a valid image this operation does not handle
          +-- ParentMissing     VHD_PARENT_MISSING: no parent locator leads to a file
          +-- ParentMismatch    VHD_PARENT_MISMATCH: the parent's UUID is not the one recorded
          +-- ParentNotAllowed  VHD_PARENT_NOT_ALLOWED: the parent resolves outside allowed dirs
          +-- ParentLoop        VHD_PARENT_LOOP: an image is its own ancestor
          +-- ChainTooDeep      VHD_CHAIN_TOO_DEEP: more than MAX_CHAIN_DEPTH images
          +-- DataBeyondEnd     VHD_DATA_BEYOND_END: a shrink would drop allocated data
          +-- Busy              VHD_BUSY: another process holds the image's lock too long
          +-- ReadOnly          VHD_READ_ONLY: a write through an image opened read-only
          +-- VhdIOError        VHD_IO_ERROR: the operating system refused an I/O (errno)
               +-- NoSpace      VHD_NO_SPACE: an image would grow past its block device

Every error's message names the file and the problem, on one line.
"""

from __future__ import annotations

from smcommon.errors import Error


class VhdError(Error):
    """Any other failure of the VHD library."""

    code = "VHD_ERROR"
    msg = "{self.reason}"


class NotFound(VhdError):
    """The image (or a file named) does not exist."""

    code = "VHD_NOT_FOUND"


class AlreadyExists(VhdError):
    """Refusing to overwrite an existing file."""

    code = "VHD_EXISTS"


class InvalidArgument(VhdError):
    """A bad size, offset, length, option."""

    code = "VHD_INVALID_ARGUMENT"


class TooLarge(VhdError):
    """A size above MAX_VIRTUAL_SIZE."""

    code = "VHD_TOO_LARGE"


class Corrupt(VhdError):
    """The image breaks a structural rule (named)."""

    code = "VHD_CORRUPT"


class Unsupported(VhdError):
    """A valid image this operation does not handle."""

    code = "VHD_UNSUPPORTED"


class ParentMissing(VhdError):
    """No parent locator leads to a file."""

    code = "VHD_PARENT_MISSING"


class ParentMismatch(VhdError):
    """The parent's UUID is not the one recorded."""

    code = "VHD_PARENT_MISMATCH"


class ParentNotAllowed(VhdError):
    """The parent resolves outside allowed dirs."""

    code = "VHD_PARENT_NOT_ALLOWED"


class ParentLoop(VhdError):
    """An image is its own ancestor."""

    code = "VHD_PARENT_LOOP"


class ChainTooDeep(VhdError):
    """More than MAX_CHAIN_DEPTH images."""

    code = "VHD_CHAIN_TOO_DEEP"


class DataBeyondEnd(VhdError):
    """A shrink would drop allocated data."""

    code = "VHD_DATA_BEYOND_END"


class Busy(VhdError):
    """Another process holds the image's lock too long."""

    code = "VHD_BUSY"


class ReadOnly(VhdError):
    """A write through an image opened read-only."""

    code = "VHD_READ_ONLY"


class VhdIOError(VhdError):
    """The operating system refused an I/O (errno)."""

    code = "VHD_IO_ERROR"
    errno: int | None = None  # the OSError's errno


class NoSpace(VhdIOError):
    """The image would grow past the end of its block device (a logical volume)."""

    code = "VHD_NO_SPACE"


def from_os_error(path: str, exc: OSError, what: str = "") -> VhdError:
    """The VhdError for an OSError met on ``path`` (NotFound for ENOENT)."""
    import errno

    action = f" ({what})" if what else ""
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT:
        return NotFound(f"{path}: no such file{action}")
    if exc.errno == errno.EEXIST:
        return AlreadyExists(f"{path}: already exists{action}")
    err = VhdIOError(f"{path}: {text}{action}")
    err.errno = exc.errno
    return err
