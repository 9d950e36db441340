"""Start a dispatcher for a bench and read what its banner says.

``start(argv, env=..., cwd=...)`` runs ``python -m dispatcher <argv>`` with
stdout piped, reads the banner up to its ``python:`` line and returns a
``Started``: the process and the unix socket, default SR and TCP URL the
banner names (None when it names none).  A bench checks what it needs with
``Started.need(...)``, which kills the daemon and exits with the banner if it
is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Started:
    proc: subprocess.Popen[str]
    banner: str
    sock: Path | None
    sr: str | None
    url: str | None

    def need(self, *what: str) -> None:
        """Exit (killing the daemon) unless the banner named each of ``what``."""
        missing = [w for w in what if getattr(self, w) is None]
        if missing:
            self.proc.kill()
            raise SystemExit(
                f"the dispatcher did not start (no {', '.join(missing)}):\n{self.banner}"
            )


def start(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path = REPO,
    stderr: int | None = None,
) -> Started:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", *argv],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=cwd,
    )
    banner = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        banner += line
        if line.startswith("  python:"):
            break

    def found(pattern: str) -> str | None:
        m = re.search(pattern, banner)
        return m.group(1) if m else None

    sock = found(r"unix socket: (\S+)")
    return Started(
        proc,
        banner,
        Path(sock) if sock else None,
        found(r"default SR: (\S+)"),
        found(r"tcp: (https?://\S+)"),
    )
