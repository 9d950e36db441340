"""Loop devices (util-linux ``losetup``), through the one runner.

Loop device numbers are shared by everything on the host: a device is always
taken with ``losetup --find --show`` (never by number) and always detached by
whoever attached it.  ``attach`` can map a byte range of its backing file or
device (``--offset``/``--sizelimit``): that is how a logical volume's extents
become a block device where device-mapper is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from smcommon.errors import BackendError, CommandError, CommandTimeout
from smcommon.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LOSETUP_TIMEOUT = 30.0


@record(frozen=True)
class Loop:
    name: str
    back_file: str
    offset: int = 0
    sizelimit: int = 0


def _run(argv: list[str], what: str, runner: Callable[..., Any] | None) -> Any:
    if runner is None:
        from smcommon.runner import run

        runner = run
    try:
        return runner(argv, timeout=LOSETUP_TIMEOUT)
    except CommandTimeout:
        raise BackendError("LOOP_TIMEOUT", [what, "losetup did not finish in time"]) from None
    except CommandError as e:
        raise BackendError("LOOP_FAILED", [what, e.err_tail]) from None


def attach(
    backing: str,
    *,
    offset: int = 0,
    size: int | None = None,
    read_only: bool = False,
    runner: Callable[..., Any] | None = None,
) -> str:
    """A new loop device over ``backing`` (from ``offset``, ``size`` bytes)."""
    argv = ["losetup", "--find", "--show"]
    if offset:
        argv += ["--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    res = _run([*argv, backing], f"attaching a loop device to {backing}", runner)
    dev = res.out.strip().splitlines()[-1] if res.out.strip() else ""
    if not dev.startswith("/dev/"):
        raise BackendError("LOOP_FAILED", [f"losetup printed no device for {backing}"])
    return str(dev)


def detach(dev: str, runner: Callable[..., Any] | None = None) -> None:
    _run(["losetup", "-d", dev], f"detaching {dev}", runner)


def list_loops(runner: Callable[..., Any] | None = None) -> list[Loop]:
    res = _run(
        ["losetup", "--list", "--json", "-O", "NAME,BACK-FILE,OFFSET,SIZELIMIT"],
        "listing loop devices",
        runner,
    )
    if not res.out.strip():
        return []
    try:
        rows = json.loads(res.out)["loopdevices"]
        return [
            Loop(
                r["name"],
                str(r.get("back-file") or "").removesuffix(" (deleted)"),
                int(r.get("offset") or 0),
                int(r.get("sizelimit") or 0),
            )
            for r in rows
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError("LOOP_FAILED", [f"unreadable losetup listing: {e}"]) from None
