"""Replaying real tool outputs (tests/data/captures, see its README) through a fake runner.

``load(tool, case)`` parses one capture file; ``Replay`` is a runner that
expects a given sequence of argv lists, checks each call's argv exactly, and
answers with the capture's exit status and streams, raising ``CommandError``
(secrets masked) for an exit code the caller did not allow, as
``smcommon.runner.run`` does.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smcommon.errors import CommandError, CommandTimeout
from smcommon.runner import Result, mask

DATA = Path(__file__).resolve().parents[2] / "data" / "captures"


@dataclass(frozen=True)
class Capture:
    argv: list[str]
    exit: int | str
    stdout: str
    stderr: str


def load(tool: str, case: str) -> Capture:
    text = (DATA / tool / f"{case}.txt").read_text(encoding="utf-8")
    head, _, rest = text.partition("## stdout\n")
    out, _, err = rest.partition("## stderr\n")
    meta = {}
    for line in head.splitlines():
        if line.startswith("# ") and ": " in line:
            k, v = line[2:].split(": ", 1)
            meta[k] = v
    if meta.get("stdout_trailing_newline") == "no":
        out = out[:-1]
    if meta.get("stderr_trailing_newline") == "no" and err.endswith("\n"):
        err = err[:-1]
    code: int | str = meta["exit"]
    if isinstance(code, str) and code.lstrip("-").isdigit():
        code = int(code)
    return Capture(shlex.split(meta["argv"]), code, out, err)


@dataclass
class Replay:
    """A runner answering ``script`` in order: (expected argv, capture) pairs."""

    script: list[tuple[list[str], Capture]]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, argv: list[str], **kw: Any) -> Result:
        assert self.script, f"unexpected command {argv}"
        want, cap = self.script.pop(0)
        assert list(argv) == want, f"argv {argv} != expected {want}"
        self.calls.append({"argv": list(argv), **kw})
        secrets = kw.get("secrets", ())
        if cap.exit == "killed-after-timeout":
            raise CommandTimeout([mask(a, secrets) for a in argv], kw.get("timeout", 0))
        assert isinstance(cap.exit, int)
        if cap.exit not in tuple(kw.get("ok_codes", (0,))):
            raise CommandError(
                [mask(a, secrets) for a in argv],
                cap.exit,
                mask(cap.stdout, secrets),
                mask(cap.stderr, secrets),
            )
        return Result(cap.exit, cap.stdout, cap.stderr)

    def done(self) -> None:
        assert not self.script, f"commands not run: {[a for a, _ in self.script]}"
