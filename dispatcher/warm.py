"""Warm plugin processes: one zygote per plugin, one forked child per call.

Owns ``WarmPool`` (the zygotes of a dispatcher: start, freshness, retire,
status) and ``Zygote`` (one ``dispatcher/zygote.py`` process and its control
socket).  ``Child`` asks ``WarmPool.spawner(plugin)`` for a zygote; with one,
the call's process is forked from it (``Zygote.spawn``) instead of executed,
and reaped through it (``Zygote.reap``); without one (none yet, starting,
stale, dead, not a Python plugin, ``--no-warm``) the call is executed as
always.  The child is what an exec'd plugin would be (see zygote.py): its
request on stdin, response on stdout, stderr to the dispatcher, its own
process group, so timeouts, cancellation, output limits and reaping work
unchanged.

Freshness: a zygote is replaced when a file it loaded (the plugin, its
modules, the library: ``files`` of its ready message, checked by mtime and
size before each call) changed, after ``max_calls`` calls, when its memory
grew by ``max_growth`` bytes, and when it died.  The call that finds it so
runs by exec; a new zygote starts in the background for the next calls.  A
replaced zygote forks no more and exits once its last child is reaped.

The interpreter (``interpreter(plugin)``): a plugin whose first line is
``#!/usr/bin/env python3`` would run whatever ``python3`` comes first on PATH
(a version manager's shim here, ~70 ms more per start, and not the
interpreter the package is installed in): the dispatcher runs such plugins,
executed or warm, with its own interpreter (``sys.executable``), keeping the
flags of the ``#!`` line.  A plugin naming an absolute interpreter keeps it.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
READY_TIMEOUT = 60.0  # seconds a new zygote may take to import what calls need
IO_TIMEOUT = 10.0  # seconds one fork/reap exchange may take
MAX_MSG = 1 << 20


class WarmUnavailable(Exception):
    """The zygote cannot fork this call: run it by exec."""


@dataclass(frozen=True)
class Interpreter:
    argv: list[str]  # interpreter and flags: run as argv + [plugin]
    python: bool  # a Python interpreter: the plugin can be warm
    via_env: bool  # "#!/usr/bin/env python3": the dispatcher's interpreter instead


def interpreter(plugin: Path, own: str) -> Interpreter | None:
    """How to run ``plugin`` (see the module doc); None: execute the file itself."""
    try:
        with open(plugin, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env":
        words = words[1:]
        if not words or not os.path.basename(words[0]).startswith("python"):
            return None
        return Interpreter([own, *words[1:]], True, True)
    if os.path.basename(words[0]).startswith("python"):
        return Interpreter(words, True, False)
    return None


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Zygote:
    """One warm parent (see zygote.py for the protocol)."""

    def __init__(self, plugin: Path, argv: list[str], env: dict[str, str]) -> None:
        self.plugin = plugin
        self.argv = argv
        self.env = env
        self.pid = 0
        self.started = time.monotonic()
        self.calls = 0
        self.state = "starting"  # starting, ready, draining, dead
        self.why = ""
        self.files: list[tuple[str, tuple[int, int] | None]] = []
        self.rss0 = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._children: set[int] = set()
        self.reaper: threading.Thread | None = None

    # -- life ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and wait (bounded) until it is ready; ``state`` says how it went."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, null, 1),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
            ]
            argv = [*self.argv, str(ZYGOTE), str(self.plugin)]
            self.pid = os.posix_spawn(argv[0], argv, self.env, file_actions=actions, setsid=True)
        except OSError as e:
            ours.close()
            self._dead(f"could not be started: {e}")
            return
        finally:
            os.close(null)
            theirs.close()
        self._sock = ours
        ours.settimeout(READY_TIMEOUT)
        try:
            msg = json.loads(ours.recv(MAX_MSG) or b"null")
        except (OSError, ValueError) as e:
            msg = None
            self.why = f"no ready message: {e}"
        if not isinstance(msg, dict) or msg.get("ready") != self.pid:
            self._dead(self.why or f"not ready: {str(msg)[:200]}")
            return
        self.files = [(f, _stamp(f)) for f in msg.get("files", []) if isinstance(f, str)]
        self.rss0 = _rss(self.pid)
        ours.settimeout(IO_TIMEOUT)
        self.state = "ready"
        log.info("warm parent of %s ready: pid %d, %d files watched, %d KiB",
                 self.plugin, self.pid, len(self.files), self.rss0 >> 10)  # fmt: skip

    def _dead(self, why: str) -> None:
        self.state = "dead"
        self.why = why
        log.warning("warm parent of %s (pid %s) %s", self.plugin, self.pid or "-", why)
        self._close()

    def _close(self) -> None:
        """Close the control socket (the zygote exits on EOF) and reap it (in the background)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        pid = self.pid
        if pid and self.reaper is None:
            self.reaper = threading.Thread(target=_reap_quietly, args=(pid,), daemon=True)
            self.reaper.start()

    def stale(self, max_calls: int, max_growth: int) -> str:
        """Why this zygote must not fork the next call ("" if it may)."""
        if self.state != "ready":
            return self.state
        for f, stamp in self.files:
            if _stamp(f) != stamp:
                return f"{f} changed"
        if self.calls >= max_calls:
            return f"served {self.calls} calls"
        rss = _rss(self.pid)
        if not rss:
            return "died"
        if rss - self.rss0 > max_growth:
            return f"grew from {self.rss0 >> 10} to {rss >> 10} KiB"
        return ""

    def retire(self, why: str) -> None:
        """Fork no more; exit once the last child has been reaped."""
        with self._lock:
            if self.state in ("draining", "dead"):
                return
            self.state = "draining"
            self.why = why
            idle = not self._children
        log.info("warm parent of %s (pid %d) replaced: %s", self.plugin, self.pid, why)
        if idle:
            self._close()

    # -- calls -----------------------------------------------------------------------

    def spawn(self, env: dict[str, str], fds: tuple[int, int, int]) -> int:
        """Fork a child with these stdin, stdout, stderr; its pid (WarmUnavailable if not)."""
        req = {"op": "fork", "env": env, "cwd": os.getcwd(), "umask": _umask()}
        with self._lock:
            if self.state != "ready" or self._sock is None:
                raise WarmUnavailable(self.state)
            try:
                self._sock.sendmsg(
                    [json.dumps(req).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                )
                reply = json.loads(self._sock.recv(MAX_MSG) or b"null")
            except (OSError, ValueError) as e:
                reply = {"error": str(e) or type(e).__name__}
            pid = reply.get("pid") if isinstance(reply, dict) else None
            if not isinstance(pid, int) or pid <= 0:
                why = reply.get("error") if isinstance(reply, dict) else reply
                self.state = "dead"
                self.why = f"fork failed: {why}"
            else:
                self.calls += 1
                self._children.add(pid)
                return pid
        self._dead(self.why)
        raise WarmUnavailable(self.why)

    def reap(self, pid: int, wait: bool = True) -> int | None:
        """Reap child ``pid`` (it has exited); its exit status, None if it was
        lost.  ``wait=False``: the child said its status (``EXIT_MARK``) and
        was killed; the zygote reaps it when its exit ends, and this returns
        at once (None, unless it had ended)."""
        with self._lock:
            status: int | None = None
            sock = self._sock
            if sock is not None:
                try:
                    sock.send(json.dumps({"op": "reap", "pid": pid, "wait": wait}).encode())
                    reply = json.loads(sock.recv(MAX_MSG) or b"null")
                    if isinstance(reply, dict) and isinstance(reply.get("status"), int):
                        status = reply["status"]
                except (OSError, ValueError):
                    pass
            self._children.discard(pid)
            drained = self.state == "draining" and not self._children
        if drained:
            self._close()
        return status

    def spare(self) -> int:
        """The pid of the child forked ahead for the next call (0: none)."""
        with self._lock:
            sock = self._sock
            if sock is None or self.state != "ready":
                return 0
            try:
                sock.send(b'{"op": "spare"}')
                reply = json.loads(sock.recv(MAX_MSG) or b"null")
            except (OSError, ValueError):
                return 0
        spare = reply.get("spare") if isinstance(reply, dict) else None
        return spare if isinstance(spare, int) else 0

    def as_struct(self) -> dict[str, Any]:
        return {
            "plugin": str(self.plugin),
            "pid": self.pid,
            "state": self.state,
            "age": round(time.monotonic() - self.started, 1),
            "calls": self.calls,
            "children": len(self._children),
            "spare": self.spare(),
            "rss": _rss(self.pid) if self.state in ("ready", "draining") else 0,
            "why": self.why,
        }


def _umask() -> int:
    # os.umask is the only way to read it; the dispatcher never changes it
    # while serving, so setting it back at once races with nothing
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reap_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class WarmPool:
    """The zygotes of one dispatcher, one per plugin executable."""

    def __init__(
        self,
        own_interpreter: str,
        env: dict[str, str],
        *,
        max_calls: int = 1000,
        max_growth: int = 64 << 20,
    ) -> None:
        self.own = own_interpreter
        self.env = env
        self.max_calls = max_calls
        self.max_growth = max_growth
        self._lock = threading.Lock()
        self._current: dict[Path, Zygote] = {}
        self._retired: list[Zygote] = []
        self._closed = False

    def spawner(self, plugin: Path) -> Zygote | None:
        """A ready zygote for ``plugin``, or None (then one is started for later calls)."""
        with self._lock:
            z = self._current.get(plugin)
            if z is not None and z.state == "starting":
                return None
            if z is not None:
                why = z.stale(self.max_calls, self.max_growth)
                if not why:
                    return z
                del self._current[plugin]
                if z.state != "dead":
                    self._retired.append(z)
                    z.retire(why)
            if self._closed:
                return None
            interp = interpreter(plugin, self.own)
            if interp is None or not interp.python:
                return None
            z = Zygote(plugin, interp.argv, self.env)
            self._current[plugin] = z
        threading.Thread(target=z.start, daemon=True, name=f"zygote {plugin.name}").start()
        return None

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            self._retired = [z for z in self._retired if z.state == "draining"]
            return [z.as_struct() for z in [*self._current.values(), *self._retired]]

    def close(self, wait: float = 5.0) -> None:
        """Retire every zygote, and wait (bounded) for those with no child left to exit."""
        with self._lock:
            self._closed = True
            zs = [*self._current.values(), *self._retired]
            self._current.clear()
        for z in zs:
            if z.state == "starting":
                deadline = time.monotonic() + READY_TIMEOUT
                while z.state == "starting" and time.monotonic() < deadline:
                    time.sleep(0.01)
            z.retire("the dispatcher stops")
        deadline = time.monotonic() + wait
        for z in zs:
            if z.reaper is not None:
                z.reaper.join(max(0.0, deadline - time.monotonic()))
