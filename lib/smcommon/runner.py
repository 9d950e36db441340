"""One runner for every outside command.

``run(argv)`` takes an argv list (never a shell string), captures both streams,
always has a timeout, kills the child's whole process group if anything goes
wrong, and raises ``CommandError`` for an exit code the caller did not allow.
Wrappers (lvm, iscsi, mount …) take a runner as an argument so unit tests can
pass a fake that replays captured real output.

Every command dies with its caller: it runs in a session of its own (so a
timeout can kill its whole group) and with PR_SET_PDEATHSIG, so a plugin
killed by the dispatcher (timeout, cancel, kill -9) never leaves an mkfs or a
mount running behind it.

Secrets (CHAP passwords) are passed in ``secrets``: they are masked in every
error and log line this module produces.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from smcommon.errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
MASK = "******"


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


Runner = Callable[..., Result]

PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None


def _die_with_caller() -> Callable[[], None]:
    """A preexec function: the child gets SIGKILL when this process dies."""
    global _prctl
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl = _prctl
    caller = os.getpid()

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != caller:  # the caller died before prctl took effect
            os._exit(137)

    return setup


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def run(
    argv: Sequence[str],
    *,
    input: str | bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ok_codes: Iterable[int] = (0,),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    secrets: Sequence[str] = (),
) -> Result:
    """Run ``argv`` and return its Result; raise on a disallowed exit code."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("run() takes an argv list, never a shell string")
    argv = [os.fspath(a) for a in argv]
    shown = [mask(a, secrets) for a in argv]
    data = input.encode() if isinstance(input, str) else input
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_caller(),  # noqa: PLW1509 (prctl + getppid only; plugins are single-threaded)
    )
    try:
        out_b, err_b = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CommandTimeout(shown, timeout) from None
    finally:
        if proc.returncode is None:
            _kill_group(proc)
    out = out_b.decode("utf-8", "replace")
    err = err_b.decode("utf-8", "replace")
    elapsed = time.monotonic() - start
    log.debug("ran %s rc=%d in %.3fs", shown, proc.returncode, elapsed)
    if proc.returncode not in tuple(ok_codes):
        raise CommandError(
            shown, proc.returncode, mask(out, secrets), mask(err, secrets)
        )
    return Result(proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
