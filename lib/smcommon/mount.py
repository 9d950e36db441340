"""Mounting and unmounting, and what ``/proc/self/mounts`` says.

This module owns the ``mount`` and ``umount`` commands (through the one runner,
argv lists, a timeout every time) and the parsing of the kernel's mount table.
SR types that mount something (ext on a block device, nfs) use it; it knows
nothing about SRs.

- ``mount(source, target, fstype=..., options=[...])`` runs
  ``mount -t FSTYPE -o OPT,OPT SOURCE TARGET``; ``bind(src, target)`` runs
  ``mount --bind SRC TARGET``.  A failure is ``MountFailed`` with mount's own
  words (its last stderr lines); a command past its timeout is ``MountFailed``
  too, saying so.
- ``umount(target)`` runs ``umount TARGET``: never lazily (``-l``) and never
  forced: a mount still in use is ``MountBusy`` (the caller reports it; a
  lazy detach would hide the mount from new users while a VM still writes
  through it).  A target that is not mounted is not an error.
- ``mounts()``, ``mounted_at(target)``, ``mount_points_of(device)`` read the
  table (octal escapes such as ``\\040`` decoded); the last entry of a stacked
  mount point is the one in effect.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from smcommon.errors import BackendError, CommandError, CommandTimeout
from smcommon.record import record

MOUNTS_FILE = "/proc/self/mounts"
MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 60.0

Runner = Callable[..., object]


class MountFailed(BackendError):
    """``mount`` failed: details are what, where, and mount's own message."""

    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("MOUNT_FAILED", details)


class MountBusy(BackendError):
    """``umount`` refused: the file system is in use (open files, cwd)."""

    def __init__(self, target: str, why: str) -> None:
        super().__init__(
            "MOUNT_BUSY",
            [f"{target} is in use (open files or working directories): not unmounted", why],
        )
        self.target = target


class UmountFailed(BackendError):
    def __init__(self, details: Sequence[str]) -> None:
        super().__init__("UMOUNT_FAILED", details)


@record(frozen=True)
class MountEntry:
    """One line of the mount table."""

    source: str
    target: str
    fstype: str
    options: tuple[str, ...]

    def option(self, key: str) -> str | None:
        """The value of ``key=value`` (``""`` for a bare flag), None if absent."""
        for opt in self.options:
            k, sep, v = opt.partition("=")
            if k == key:
                return v if sep else ""
        return None


def unescape(field: str) -> str:
    """Decode the kernel's octal escapes (``\\040`` space, ``\\011`` tab,
    ``\\012`` newline, ``\\134`` backslash)."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        c = field[i]
        code = field[i + 1 : i + 4]
        if c == "\\" and len(code) == 3 and all(d in "01234567" for d in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[MountEntry]:
    """The entries of a ``/proc/self/mounts`` text (malformed lines skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        out.append(
            MountEntry(
                source=unescape(parts[0]),
                target=unescape(parts[1]),
                fstype=parts[2],
                options=tuple(parts[3].split(",")),
            )
        )
    return out


def mounts(path: str = MOUNTS_FILE) -> list[MountEntry]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_mounts(f.read())
    except OSError:
        return []


def mounted_at(target: str, table: Iterable[MountEntry] | None = None) -> MountEntry | None:
    """The mount in effect at ``target`` (the last one stacked there), or None."""
    found = None
    for entry in mounts() if table is None else table:
        if entry.target == target:
            found = entry
    return found


def mount_points_of(device: str, table: Iterable[MountEntry] | None = None) -> list[str]:
    """Where the block device ``device`` is mounted (symlinks resolved)."""
    real = os.path.realpath(device)
    return [
        e.target
        for e in (mounts() if table is None else table)
        if e.source.startswith("/") and os.path.realpath(e.source) == real
    ]


def _default_runner() -> Runner:
    from smcommon.runner import run

    return run


def _tail(e: CommandError) -> str:
    lines = [ln.strip() for ln in e.err_tail.splitlines() if ln.strip()]
    # util-linux adds a hint line about dmesg: not the reason
    lines = [ln for ln in lines if not ln.startswith("dmesg(1)")]
    return " ".join(lines[-3:]) or f"exit code {e.rc}"


def mount_argv(
    source: str, target: str, fstype: str | None = None, options: Sequence[str] = ()
) -> list[str]:
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    return argv + [source, target]


def mount(
    source: str,
    target: str,
    *,
    fstype: str | None = None,
    options: Sequence[str] = (),
    runner: Runner | None = None,
    timeout: float = MOUNT_TIMEOUT,
    what: str = "",
) -> None:
    """Mount ``source`` on ``target``; MountFailed naming both and the reason."""
    _run_mount(mount_argv(source, target, fstype, options), source, target, runner, timeout, what)


def bind(
    source: str,
    target: str,
    *,
    runner: Runner | None = None,
    timeout: float = MOUNT_TIMEOUT,
    what: str = "",
) -> None:
    """Bind-mount the directory ``source`` on ``target``."""
    _run_mount(["mount", "--bind", source, target], source, target, runner, timeout, what)


def _run_mount(
    argv: list[str],
    source: str,
    target: str,
    runner: Runner | None,
    timeout: float,
    what: str,
) -> None:
    run = runner or _default_runner()
    label = what or source
    try:
        run(argv, timeout=timeout)
    except CommandTimeout:
        raise MountFailed(
            [f"mounting {label} on {target} did not finish within {timeout:g}s"]
        ) from None
    except CommandError as e:
        raise MountFailed([f"mounting {label} on {target} failed", _tail(e)]) from None


def umount(
    target: str, *, runner: Runner | None = None, timeout: float = UMOUNT_TIMEOUT
) -> bool:
    """Unmount ``target``; False if nothing was mounted there.  Never lazy."""
    run = runner or _default_runner()
    try:
        run(["umount", target], timeout=timeout)
    except CommandTimeout:
        raise UmountFailed(
            [f"unmounting {target} did not finish within {timeout:g}s"]
        ) from None
    except CommandError as e:
        why = _tail(e)
        if "not mounted" in why or "no mount point specified" in why:
            return False
        if "busy" in why:
            raise MountBusy(target, why) from None
        raise UmountFailed([f"unmounting {target} failed", why]) from None
    return True
