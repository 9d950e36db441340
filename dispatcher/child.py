"""One plugin process per call: spawn, feed, collect, bound, cancel, reap.

Owns ``Child``: the plugin runs as the leader of its own process group (so the
group can be signalled as a whole), gets the request on stdin, and is watched with one epoll
set over its stdin, stdout, stderr and a pidfd, until it has exited and closed
its pipes, or the per-call deadline passes.  The process is executed
(posix_spawn), or forked by a warm parent (``spawner``, ``dispatcher.warm``)
and then reaped through it; a zygote that cannot fork means exec.

Guarantees, whatever the plugin does:
- the call ends by ``timeout`` (plus a short drain bound), or when its
  ``budget`` (``dispatcher.budget``) says so at one of its deadlines: then the
  whole process group gets SIGKILL;
- ``cancel()`` (from any thread) sends SIGTERM to the group, then SIGKILL
  after ``grace`` seconds;
- when the plugin exits, whatever it left running in its group is killed
  (SIGKILL) before the leader is reaped, so no orphan survives a call, and the
  leader is always reaped (no zombie).  Killing the group while the leader is
  an unreaped zombie is safe: its pid, hence the group id, cannot be reused.
- memory is bounded: stdout up to ``max_out`` bytes (beyond: killed, marked
  ``overflow``), stderr keeps its last ``ERR_TAIL`` bytes.

``on_out(chunk, out)`` sees stdout as it arrives (the dispatcher checks a
large answer while the plugin is still writing it: ``replies.Judge``).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from smcommon.record import record

from dispatcher.warm import WarmUnavailable
from dispatcher.zygote import EXIT_MARK

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dispatcher.budget import Budget
    from dispatcher.warm import Zygote

log = logging.getLogger(__name__)
# A plugin starts with every signal at its default disposition (then Python's
# own), not with what the daemon inherited: under nohup, SIGHUP ignored.
DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}

ERR_TAIL = 8192
EXIT_MARK_PREFIX = EXIT_MARK[: EXIT_MARK.index(b"%d")]
DRAIN_BOUND = 2.0  # seconds to wait for pipes after the group was killed
READ_CHUNK = 65536


@record(frozen=True)
class ChildResult:
    rc: int | None  # exit status; negative = killed by that signal; None = never ran
    out: bytes
    err: bytes  # the tail of stderr
    duration: float
    timed_out: bool = False
    cancelled: bool = False
    overflow: bool = False
    spawn_error: str = ""
    status_lost: bool = False  # forked by a zygote that died: exit status unknown
    warm: bool = False  # forked by a zygote (dispatcher.warm), not executed

    def describe(self) -> str:
        """What happened to the process, in words (for error details)."""
        if self.spawn_error:
            return f"could not be started: {self.spawn_error}"
        if self.rc is None:
            return "did not run"
        if self.rc < 0:
            try:
                name = signal.Signals(-self.rc).name
            except ValueError:
                name = f"signal {-self.rc}"
            return f"was killed by {name}"
        return f"exited with status {self.rc}"

    def err_text(self, limit: int = 2000) -> str:
        text = self.err.decode("utf-8", "replace").strip()
        return text[-limit:]


class Child:
    """One plugin process.  ``run()`` in the calling thread; ``cancel()`` from any."""

    def __init__(
        self,
        argv: Sequence[str],
        data: bytes,
        *,
        timeout: float,
        grace: float = 5.0,
        max_out: int = 64 * 1024 * 1024,
        env: Mapping[str, str] | None = None,
        budget: Budget | None = None,
        on_start: Callable[[int], None] | None = None,
        spawner: Zygote | None = None,
        on_out: Callable[[bytes, bytearray], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.budget = budget
        self.on_start = on_start
        self.on_out = on_out
        self.spawner = spawner
        self.warm: Zygote | None = None  # the zygote that forked this process
        self.status_lost = False
        self.data = data
        self.timeout = timeout
        self.grace = grace
        self.max_out = max_out
        self.env = None if env is None else dict(env)
        self.pid: int | None = None
        # the pid once the call is started, its request written and on_start
        # done (its outcome noted): what Dispatcher.status shows, so that a
        # dispatcher killed after it was shown leaves a run a retry waits for
        self.shown_pid: int | None = None
        self.started = 0.0
        self._lock = threading.Lock()
        self._reaped = False
        self._cancelled = False
        self._rc: int | None = None
        self._said: int | None = None  # the exit status a forked child wrote
        self._sent = 0  # bytes of the request written before the watch
        self._open: set[int] = set()
        self._kill_timer: threading.Timer | None = None

    # -- signalling (any thread) ---------------------------------------------

    def _signal_group(self, sig: int) -> None:
        with self._lock:
            if self.pid is None or self._reaped:
                return
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                # not (or no longer) a group: signal the process itself
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
            except PermissionError:
                pass

    def cancel(self) -> None:
        """SIGTERM the group now, SIGKILL it after the grace period."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
        self._signal_group(signal.SIGTERM)
        timer = threading.Timer(self.grace, self._signal_group, args=(signal.SIGKILL,))
        timer.daemon = True
        self._kill_timer = timer
        timer.start()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # -- the call (one thread) -----------------------------------------------

    def run(self) -> ChildResult:
        self.started = time.monotonic()
        fds: list[int] = []
        with self._lock:
            if self._cancelled:
                return ChildResult(None, b"", b"", 0.0, cancelled=True)
            try:
                # posix_spawn (clone+vfork in glibc) into a new process group:
                # Popen(start_new_session=True) forks the whole daemon instead,
                # and a new session also gets a new scheduler autogroup; each
                # cost ~3-5 ms per call here.  Every fd the daemon owns is
                # non-inheritable (PEP 446), so only these three reach the plugin.
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                fds = [in_r, in_w, out_r, out_w, err_r, err_w]
                actions = [
                    (os.POSIX_SPAWN_DUP2, in_r, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ]
                env = os.environ if self.env is None else self.env
                pid = 0
                if self.spawner is not None:
                    try:
                        pid = self.spawner.spawn(dict(env), (in_r, out_w, err_w))
                        self.warm = self.spawner
                    except WarmUnavailable:
                        pass  # the call that finds the zygote gone runs by exec
                if self.warm is None:
                    pid = os.posix_spawnp(
                        self.argv[0], self.argv, env, file_actions=actions, setpgroup=0,
                        setsigdef=DEFAULT_SIGNALS,
                    )
                self.pid = pid
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                return ChildResult(
                    None, b"", b"", time.monotonic() - self.started, spawn_error=str(e)
                )
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        self._open = {in_w, out_r, err_r}
        # the request, or as much as the pipe takes (all of one below 64 KiB),
        # before the call is shown as started: a dispatcher killed after that
        # leaves a plugin that has its whole request (dispatcher/outcomes.py)
        os.set_blocking(in_w, False)
        try:
            self._sent = os.write(in_w, self.data[:READ_CHUNK]) if self.data else 0
        except BlockingIOError:
            self._sent = 0
        except OSError:  # it is gone already: _watch sees it
            self._sent = len(self.data)
        if self.on_start is not None:
            try:
                self.on_start(pid)
            except Exception:  # bookkeeping never fails the call
                log.exception("on_start of pid %s", pid)
        self.shown_pid = pid
        try:
            return self._watch(pid, in_w, out_r, err_r)
        finally:
            self._reap(pid)
            for fd in list(self._open):
                self._close(fd)

    def _close(self, fd: int) -> None:
        """Close one of our pipe ends once (a number closed twice may be another call's)."""
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def _watch(self, pid: int, stdin_fd: int, out_fd: int, err_fd: int) -> ChildResult:
        out = bytearray()
        err = bytearray()
        timed_out = overflow = False
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # a forked child whose zygote died: already reaped by init
            pidfd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        sel = selectors.DefaultSelector()
        try:
            pending = memoryview(self.data)[self._sent :]
            if pending:
                sel.register(stdin_fd, selectors.EVENT_WRITE)
            else:
                self._close(stdin_fd)
            sel.register(out_fd, selectors.EVENT_READ)
            sel.register(err_fd, selectors.EVENT_READ)
            sel.register(pidfd, selectors.EVENT_READ)
            budget = self.budget
            if budget is None:
                deadline = self.started + self.timeout
            else:
                deadline = budget.first(self.started)
            hard_deadline: float | None = None
            exited = False
            open_pipes = {out_fd, err_fd}
            while open_pipes or not exited:
                now = time.monotonic()
                if hard_deadline is None and now >= deadline:
                    later = budget.check(now) if budget is not None else None
                    if later is not None:
                        deadline = later
                        continue
                    timed_out = True
                    self._signal_group(signal.SIGKILL)
                    hard_deadline = now + DRAIN_BOUND
                if hard_deadline is not None and now >= hard_deadline:
                    break  # something outside the group holds the pipes
                wait = (hard_deadline if hard_deadline is not None else deadline) - now
                for key, _events in sel.select(max(wait, 0.0)):
                    fd = key.fd
                    if fd == stdin_fd:
                        try:
                            n = os.write(fd, pending[:READ_CHUNK])
                            pending = pending[n:]
                        except BlockingIOError:
                            continue
                        except OSError as e:
                            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                                raise
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(fd)
                            self._close(fd)
                    elif fd == pidfd:
                        exited = True
                        sel.unregister(pidfd)
                        # leftovers of the plugin's group die with the call
                        self._signal_group(signal.SIGKILL)
                        if hard_deadline is None:
                            hard_deadline = time.monotonic() + DRAIN_BOUND
                    else:
                        chunk = os.read(fd, READ_CHUNK)
                        if not chunk:
                            sel.unregister(fd)
                            open_pipes.discard(fd)
                        elif fd == out_fd:
                            out += chunk
                            if len(out) > self.max_out and not overflow:
                                overflow = True
                                self._signal_group(signal.SIGKILL)
                                hard_deadline = time.monotonic() + DRAIN_BOUND
                                del out[self.max_out :]
                            elif overflow:
                                del out[self.max_out :]
                            elif self.on_out is not None:
                                self.on_out(chunk, out)
                        else:
                            err += chunk
                            if len(err) > 2 * ERR_TAIL:
                                del err[:-ERR_TAIL]
                        if not open_pipes and not exited and self.warm is not None:
                            said = _exit_mark(err)
                            if said is not None:
                                # a forked child that finished: its status, without
                                # waiting for its exit's teardown (dispatcher/zygote.py)
                                self._said = said
                                exited = True
                                self._signal_group(signal.SIGKILL)
        finally:
            sel.close()
            os.close(pidfd)
        rc = self._reap(pid)
        return ChildResult(
            rc,
            bytes(out),
            bytes(err[-ERR_TAIL:]),
            time.monotonic() - self.started,
            timed_out=timed_out,
            cancelled=self._cancelled,
            overflow=overflow,
            status_lost=self.status_lost,
            warm=self.warm is not None,
        )

    def _reap(self, pid: int) -> int:
        """Kill what is left of the group, then reap the leader; idempotent."""
        with self._lock:
            if self._rc is not None:
                return self._rc
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.warm is not None and self._said is not None:
                self.warm.reap(pid, wait=False)
                self._rc = self._said
            elif self.warm is not None:
                rc = self.warm.reap(pid)
                if rc is None:
                    self.status_lost = True
                self._rc = 0 if rc is None else rc
            else:
                _pid, status = os.waitpid(pid, 0)
                self._rc = os.waitstatus_to_exitcode(status)
            self._reaped = True
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        return self._rc


def _exit_mark(err: bytearray) -> int | None:
    """The exit status at the end of a forked child's stderr (the mark is
    removed from it), or None if its stderr does not end with one."""
    if not err.endswith(b"\0"):
        return None
    _head, sep, rest = bytes(err[-40:]).rpartition(EXIT_MARK_PREFIX)
    if not sep:
        return None
    try:
        status = int(rest[:-1])
    except ValueError:
        return None
    del err[-(len(sep) + len(rest)) :]
    return status
