"""Is a device_config safe to use: path SRs under the host's SR roots, devices that hold nothing.

Owns the checks an SR type runs before it touches what device_config names:

- ``sr_roots()``: the directories path SRs may live in: ``$SM_SR_PATHS``
  (colon-separated absolute paths), else ``/srv:/var/lib/sm``, plus
  ``$SM_ROOT/sr`` when ``SM_ROOT`` is set (the development layout).
- ``allowed_path(value, reserved=host_dirs(paths))``: ``value`` with every
  existing part resolved (a symlink cannot lead out of a root), if it lies
  strictly under a root and is none of the host's own directories nor in one
  (``host_dirs``: the state directory and its registry, spool and dispatcher
  state, run, log and configuration directories; ``/var/lib/sm`` is both a
  root and the host's state directory); else ``PATH_NOT_ALLOWED`` naming the
  roots, or the host directory.
- ``findings(device)``: what uses or holds a block device, in words: a mount
  of it, of a partition or of a holder (``lsblk --json``, its tree of
  partitions and holders with their mount points, and the mount table by
  device number), and the signatures on it: a filesystem, an LVM physical
  volume, a partition table (``wipefs --no-act --json``: it reads, never
  writes).
- ``check_device(device, create, force)``: ``DEVICE_IN_USE`` if it or a
  partition or holder is mounted (whatever ``force`` says); on create,
  ``DEVICE_NOT_EMPTY`` for any signature or partition unless ``force``.  The
  error lists what was found.

Outside commands go through the runner passed in (``smcommon.runner.run``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from smcommon.errors import BackendError, CommandError, CommandTimeout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from smcommon.paths import Paths

SR_PATHS_ENV = "SM_SR_PATHS"
DEFAULT_ROOTS = ("/srv", "/var/lib/sm")
PROBE_TIMEOUT = 60.0
PARTITION_TABLES = frozenset({"dos", "gpt", "PMBR", "atari", "sun", "bsd", "mac", "sgi"})


# -- path SRs --------------------------------------------------------------------------


def sr_roots() -> list[Path]:
    """The directories path SRs may live in (see the module doc)."""
    text = os.environ.get(SR_PATHS_ENV)
    if text is not None:
        return [Path(p) for p in text.split(":") if p and os.path.isabs(p)]
    roots = [Path(p) for p in DEFAULT_ROOTS]
    if os.environ.get("SM_ROOT"):
        roots.append(Path(os.environ["SM_ROOT"]) / "sr")
    return roots


def _resolved(path: str) -> Path:
    """``path`` with every existing part resolved (the rest appended as it is)."""
    p = Path(os.path.abspath(path))
    missing: list[str] = []
    while not os.path.lexists(p) and p != p.parent:
        missing.insert(0, p.name)
        p = p.parent
    return Path(os.path.realpath(p)).joinpath(*missing)


def host_dirs(paths: Paths) -> tuple[list[Path], list[Path]]:
    """The host's own directories no path SR may be: (those it may not be,
    those it may not be nor lie in).  The state directory itself holds the
    SRs of the default root ``/var/lib/sm``; its entries the host uses
    (the registry ``sr``, the upload spool ``import``, ``dispatcher``) and
    the run, log and configuration directories are closed to SRs."""
    state = paths.state_dir
    return [state], [
        state / "sr",
        state / "import",
        state / "dispatcher",
        paths.run_dir,
        paths.log_dir,
        paths.etc_dir,
    ]


def allowed_path(
    value: str,
    roots: list[Path] | None = None,
    reserved: tuple[list[Path], list[Path]] = ([], []),
) -> Path:
    """``value`` resolved, if it lies strictly under an SR root and is none
    of the ``reserved`` host directories (``host_dirs``)."""
    roots = sr_roots() if roots is None else roots
    if ".." in Path(value).parts:
        raise BackendError("PATH_NOT_ALLOWED", [f"path {value} must not hold '..'"])
    real = _resolved(value)
    exact, trees = reserved
    for d in [*exact, *trees]:
        rd = _resolved(str(d))
        if real == rd or (d in trees and real.is_relative_to(rd)):
            where = "is" if real == rd else "lies in"
            raise BackendError(
                "PATH_NOT_ALLOWED",
                [f"{value} {where} the host's own directory {d}: an SR cannot live there"],
            )
    for r in roots:
        rr = _resolved(str(r))
        if real != rr and real.is_relative_to(rr):
            return real
    shown = ", ".join(str(r) for r in roots) or "none"
    resolved = "" if str(real) == value else f" (resolved: {real})"
    if any(real == _resolved(str(r)) for r in roots):
        raise BackendError(
            "PATH_NOT_ALLOWED",
            [f"{value}{resolved} is an SR root itself: an SR is a directory below one ({shown})"],
        )
    raise BackendError(
        "PATH_NOT_ALLOWED",
        [
            (
                f"{value}{resolved} is not under an SR root: {shown} "
                f"(the host's {SR_PATHS_ENV}, colon-separated)"
            )
        ],
    )


# -- block devices ------------------------------------------------------------------------


def _run(run: Callable[..., Any] | None, argv: list[str]) -> str:
    if run is None:
        from smcommon.runner import run as default_run

        run = default_run
    try:
        result = run(argv, timeout=PROBE_TIMEOUT)
    except (CommandError, CommandTimeout) as e:
        raise BackendError("DEVICE_PROBE_FAILED", [f"{argv[0]}: {e}"]) from None
    out = result.out
    return out if isinstance(out, str) else out.decode("utf-8", "replace")


def _json(text: str, tool: str, device: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        raise BackendError(
            "DEVICE_PROBE_FAILED", [f"{tool} on {device}: unreadable output"]
        ) from None


def tree(device: str, run: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """The device, its partitions and holders, as ``lsblk --json`` nodes (flat)."""
    doc = _json(
        _run(run, ["lsblk", "--json", "--output", "PATH,MAJ:MIN,TYPE,MOUNTPOINTS", device]),
        "lsblk",
        device,
    )
    out: list[dict[str, Any]] = []

    def walk(nodes: Any, depth: int) -> None:
        for n in nodes if isinstance(nodes, list) else []:
            if isinstance(n, dict):
                out.append({**n, "depth": depth})
                walk(n.get("children"), depth + 1)

    walk(doc.get("blockdevices") if isinstance(doc, dict) else None, 0)
    return out


def mounted(device: str, run: Callable[..., Any] | None = None) -> list[str]:
    """Where the device, a partition or a holder of it is mounted, in words."""
    from smcommon import mount

    found: list[str] = []
    numbers: dict[str, str] = {}
    for n in tree(device, run):
        path = str(n.get("path") or "?")
        what = path if n["depth"] == 0 else f"{path} ({n.get('type') or 'part'} of {device})"
        if n.get("maj:min"):
            numbers[str(n["maj:min"])] = what
        for m in n.get("mountpoints") or []:
            if m:
                found.append(f"{what} is mounted at {m}")
    try:
        rdev = os.stat(device).st_rdev
        numbers.setdefault(f"{os.major(rdev)}:{os.minor(rdev)}", device)
    except OSError:
        pass
    for e in mount.mounts():
        if not e.source.startswith("/"):
            continue
        try:
            rdev = os.stat(e.source).st_rdev
        except OSError:
            continue
        user = numbers.get(f"{os.major(rdev)}:{os.minor(rdev)}")
        line = f"{user} is mounted at {e.target}"
        if user is not None and line not in found:
            found.append(line)
    return found


def signatures(device: str, run: Callable[..., Any] | None = None) -> list[str]:
    """Filesystem, LVM and partition-table signatures on the device, in words."""
    doc = _json(_run(run, ["wipefs", "--no-act", "--json", device]), "wipefs", device)
    out = []
    for sig in doc.get("signatures", []) if isinstance(doc, dict) else []:
        kind = str(sig.get("type", "?"))
        at = sig.get("offset", "?")
        label = f" labelled {sig['label']!r}" if sig.get("label") else ""
        if kind == "LVM2_member":
            out.append(f"an LVM physical volume (LVM2_member at {at})")
        elif kind in PARTITION_TABLES:
            out.append(f"a {kind} partition table (at {at})")
        else:
            out.append(f"a {kind} filesystem or signature{label} (at {at})")
    return out


def check_device(
    device: str, create: bool, force: bool = False, run: Callable[..., Any] | None = None
) -> None:
    """Refuse a device in use, or (on create, unless ``force``) one that holds anything."""
    users = mounted(device, run)
    if users:
        raise BackendError("DEVICE_IN_USE", [f"{device}: " + "; ".join(users)])
    if not create or force:
        return
    found = signatures(device, run)
    parts = [str(n.get("path")) for n in tree(device, run) if n["depth"] > 0]
    if parts:
        found.append(f"partitions or holders {', '.join(parts)}")
    if found:
        raise BackendError(
            "DEVICE_NOT_EMPTY",
            [
                f"{device} holds " + "; ".join(found)
                + ": SR.create would destroy it (device_config force=true formats it anyway)"
            ],
        )


def forced(device_config: dict[str, str]) -> bool:
    """device_config ``force``: true/yes/1/on (anything else is false)."""
    return str(device_config.get("force", "")).strip().lower() in ("true", "yes", "1", "on")
