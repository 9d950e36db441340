"""A fake runner that replays captured real outputs (tests/data/captures, loaded by
tests/unit/storage/captures.py) for an expected sequence of argv lists.

``Replay`` checks each call's argv exactly as it is made, records the keyword
arguments (timeout, env, secrets), and answers with the capture's exit status
and streams, raising ``CommandError`` (secrets masked, as
``smcommon.runner.run`` does) for an exit code the caller did not allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from captures import Capture, load
from smcommon.errors import CommandError, CommandTimeout
from smcommon.runner import Result, mask

__all__ = ["Capture", "Replay", "load", "synthetic"]


def synthetic(rc: int, out: str = "", err: str = "") -> Capture:
    """An answer that was not captured (each test says why it needs one)."""
    return Capture("synthetic", "synthetic", [], rc, 0.0, out, err)


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
        shown = [mask(a, secrets) for a in argv]
        if cap.exit is None:
            raise CommandTimeout(shown, kw.get("timeout", 0))
        if cap.exit not in tuple(kw.get("ok_codes", (0,))):
            raise CommandError(shown, cap.exit, mask(cap.stdout, secrets),
                               mask(cap.stderr, secrets))
        return Result(cap.exit, cap.stdout, cap.stderr)

    def done(self) -> None:
        assert not self.script, f"commands not run: {[a for a, _ in self.script]}"
