"""Captured real outputs (tests/data/captures) and a fake runner replaying them.

A capture file holds one real command's argv, exit status, stdout and stderr,
taken on a full kernel (see tests/data/captures/README.md).  ``FakeRunner``
stands in for ``smcommon.runner.run``: it records every argv it is given and
answers with the next capture, raising ``CommandError`` for an exit code the
caller did not allow and ``CommandTimeout`` for a capture the harness had to
kill (``# exit: killed-after-timeout``), as the real runner would.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smcommon.errors import CommandError, CommandTimeout
from smcommon.runner import Result

DATA = Path(__file__).resolve().parents[2] / "data" / "captures"


@dataclass(frozen=True)
class Capture:
    tool: str
    case: str
    argv: list[str]
    exit: int | None  # None: still running when the harness killed it
    seconds: float
    stdout: str
    stderr: str


def load(tool: str, case: str) -> Capture:
    text = (DATA / tool / f"{case}.txt").read_text(encoding="utf-8")
    head, _, rest = text.partition("## stdout\n")
    out, _, err = rest.partition("## stderr\n")
    meta: dict[str, str] = {}
    for line in head.splitlines():
        if line.startswith("# ") and ": " in line:
            k, _, v = line[2:].partition(": ")
            meta[k] = v
    if meta.get("stdout_trailing_newline") == "no":
        out = out[:-1]
    if meta.get("stderr_trailing_newline") == "no":
        err = err[:-1]
    code = meta["exit"]
    return Capture(
        tool,
        case,
        shlex.split(meta["argv"]),
        None if not code.lstrip("-").isdigit() else int(code),
        float(meta.get("seconds", "0")),
        out,
        err,
    )


@dataclass
class FakeRunner:
    """Answers each call with the next capture; records the argv lists."""

    replies: list[Capture]
    calls: list[list[str]] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)

    def __init__(self, *replies: Capture) -> None:
        self.replies = list(replies)
        self.calls = []
        self.timeouts = []

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 120.0,
        ok_codes: Iterable[int] = (0,),
        **_: object,
    ) -> Result:
        self.calls.append(list(argv))
        self.timeouts.append(timeout)
        if not self.replies:
            raise AssertionError(f"unexpected command {list(argv)}")
        cap = self.replies.pop(0)
        if cap.exit is None:
            raise CommandTimeout(list(argv), timeout)
        if cap.exit not in tuple(ok_codes):
            raise CommandError(list(argv), cap.exit, cap.stdout, cap.stderr)
        return Result(cap.exit, cap.stdout, cap.stderr)
