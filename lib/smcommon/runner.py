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

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from smcommon.errors import CommandError, CommandTimeout
from smcommon.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
MASK = "******"


@record(frozen=True)
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
    import subprocess  # here, not above: a plugin call that runs no command (most) skips its 2.5 ms

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


def spawn_detached(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> int:
    """Start ``argv`` detached from this process and return its pid.

    A double fork: the command runs in a session of its own, is never this
    process's child (no zombie to reap, it outlives the caller and is not
    killed with the caller's process group), and holds none of the caller's
    descriptors (stdin, stdout and stderr are /dev/null; every other
    descriptor is close-on-exec).  For long-lived helpers such as an SR's
    garbage collector, which stop themselves when their work is done.
    An exec failure raises ``CommandError`` (rc 127).
    """
    if isinstance(argv, (str, bytes)):
        raise TypeError("spawn_detached() takes an argv list, never a shell string")
    args = [os.fspath(a) for a in argv]
    environ = dict(os.environ if env is None else env)
    r, w = os.pipe()  # both close-on-exec
    pid = os.fork()
    if pid == 0:  # the intermediate child: only os.* calls until _exit
        try:
            os.close(r)
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            if cwd is not None:
                os.chdir(cwd)
            os.write(w, f"{os.getpid()}\n".encode())
            os.execve(args[0], args, environ)
        except BaseException as e:  # noqa: BLE001 - reported through the pipe
            with contextlib.suppress(BaseException):
                os.write(w, f"!{e}\n".encode())
        os._exit(127)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 4096)  # EOF once the exec closed the pipe (or failed)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
    failed = [ln[1:] for ln in lines if ln.startswith("!")]
    pids = [int(ln) for ln in lines if ln.isdigit()]
    if failed or not pids:
        raise CommandError(args, 127, "", "; ".join(failed) or "no process started")
    log.debug("started %s detached as pid %d", args, pids[0])
    return pids[0]


def spawn(
    argv: Sequence[str],
    *,
    log_path: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a daemon that outlives its caller (e.g. qemu-storage-daemon).

    Unlike ``run``, the child does not die with the caller: it is the
    long-lived part of an attached SR, stopped by whoever detaches it.  It runs
    in a session of its own, stdin from /dev/null, stdout and stderr appended
    to ``log_path`` (created 0600).  ``argv`` must hold no secret: it is
    visible to every user of the host (pass secrets in files).
    """
    if isinstance(argv, (str, bytes)):
        raise TypeError("spawn() takes an argv list, never a shell string")
    argv = [os.fspath(a) for a in argv]
    import subprocess  # see run()

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=None if env is None else dict(env),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    log.debug("spawned %s pid %d", argv, proc.pid)
    return proc
