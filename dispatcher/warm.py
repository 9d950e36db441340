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
modules, the library: ``files`` of its ready message, watched with inotify,
else by mtime and size, before each call) changed, after ``max_calls``
calls, when its memory grew by ``max_growth`` bytes, and when it died.  A worn one (calls, growth)
goes on forking while its successor starts in the background; for the
others the call that finds it so runs by exec, and a new zygote starts in the
background for the next calls (after one that could not start, only
``START_BACKOFF`` seconds later).  A replaced zygote forks no more and exits
once its last child is reaped.

The interpreter (``interpreter(plugin)``): a plugin whose first line is
``#!/usr/bin/env python3`` would run whatever ``python3`` comes first on PATH
(a version manager's shim here, ~70 ms more per start, and not the
interpreter the package is installed in): the dispatcher runs such plugins,
executed or warm, with its own interpreter (``sys.executable``), keeping the
flags of the ``#!`` line.  A plugin naming an absolute interpreter keeps it.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from smcommon.record import record

log = logging.getLogger(__name__)

ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
READY_TIMEOUT = 60.0  # seconds a new zygote may take to import what calls need
IO_TIMEOUT = 10.0  # seconds one fork/reap exchange may take
START_BACKOFF = 10.0  # seconds before a plugin whose zygote could not start gets another
MAX_MSG = 1 << 20


class WarmUnavailable(Exception):
    """The zygote cannot fork this call: run it by exec."""


@record(frozen=True)
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


class FileWatch:
    """Whether any of some files changed since it was made: inotify, one
    read per check (a stat of each of ~50 files was 4.5% of the daemon's CPU
    per call); by mtime and size where inotify is not to be had."""

    # IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVE_SELF | IN_DELETE_SELF
    MASK = 0x002 | 0x004 | 0x008 | 0x800 | 0x400

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.stamps = [_stamp(f) for f in files]
        self.fd = _inotify(files, self.MASK)
        self.why = ""

    def changed(self) -> str:
        """Why the files are no longer what they were ("" if they are)."""
        if self.why:
            return self.why
        if self.fd >= 0:
            try:
                event = os.read(self.fd, 65536)
            except BlockingIOError:
                return ""
            except OSError as e:
                event = str(e).encode()
            wd = int.from_bytes(event[:4], sys.byteorder) if len(event) >= 4 else 0
            which = self.files[wd - 1] if 0 < wd <= len(self.files) else "a loaded file"
            self.why = f"{which} changed"
            return self.why
        for f, stamp in zip(self.files, self.stamps):
            if _stamp(f) != stamp:
                self.why = f"{f} changed"
        return self.why

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _inotify(files: list[str], mask: int) -> int:
    """An inotify descriptor watching ``files`` (watch n is files[n - 1]), or -1."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return -1
    if fd < 0:
        return -1
    for n, f in enumerate(files, 1):
        if libc.inotify_add_watch(fd, os.fsencode(f), mask) != n:
            os.close(fd)  # a file gone already, or no watch left: stat instead
            return -1
    return fd


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
        self.was_ready = False
        self.ended = 0.0  # when it was found dead (time.monotonic)
        self.files: FileWatch | None = None
        self.rss0 = 0
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self._lock = threading.Lock()
        self._children: set[int] = set()
        self._spares: list[tuple[int, socket.socket]] = []  # forked ahead, ours to use
        self._spare_asked = False  # a spare is on its way (one at a time)
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
        self.files = FileWatch([f for f in msg.get("files", []) if isinstance(f, str)])
        self.rss0 = _rss(self.pid)
        ours.settimeout(IO_TIMEOUT)
        self._poll = select.poll()
        self._poll.register(ours, select.POLLIN)
        self._spare_asked = True  # the zygote sends the first spare when ready
        self.state = "ready"
        self.was_ready = True
        log.info("warm parent of %s ready: pid %d, %d files watched, %d KiB",
                 self.plugin, self.pid, len(self.files.files), self.rss0 >> 10)  # fmt: skip

    def _dead(self, why: str) -> None:
        self.state = "dead"
        self.why = why
        self.ended = time.monotonic()
        log.warning("warm parent of %s (pid %s) %s", self.plugin, self.pid or "-", why)
        self._close()

    def _close(self) -> None:
        """Close the control socket (the zygote exits on EOF) and reap it (in the background)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self.files is not None:
            self.files.close()
        for _pid, spare in self._spares:
            spare.close()  # the spare sees the end of its socket and exits
        self._spares.clear()
        pid = self.pid
        if pid and self.reaper is None:
            self.reaper = threading.Thread(target=_reap_quietly, args=(pid,), daemon=True)
            self.reaper.start()

    def stale(self, max_calls: int, max_growth: int) -> tuple[str, bool]:
        """Why this zygote is to be replaced ("" if it is not), and whether it
        may fork until its successor is ready: yes if worn (its calls, its
        growth), no if a file it loaded changed or it died."""
        if self.state != "ready":
            return self.state, False
        why = self.files.changed() if self.files is not None else ""
        if why:
            return why, False
        rss = _rss(self.pid)
        if not rss:
            return "died", False
        if self.calls >= max_calls:
            return f"served {self.calls} calls", True
        if rss - self.rss0 > max_growth:
            return f"grew from {self.rss0 >> 10} to {rss >> 10} KiB", True
        return "", True

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
        """Start a child with these stdin, stdout, stderr: hand the call to a
        spare, or have the zygote fork one; its pid (WarmUnavailable if not)."""
        req = {"op": "fork", "cwd": os.getcwd(), "umask": _umask(), **env_change(self.env, env)}
        data = json.dumps(req).encode()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        with self._lock:
            if self.state != "ready" or self._sock is None:
                raise WarmUnavailable(self.state)
            self._take_spares()
            if not self._spares and self._spare_asked:
                # the zygote is forking one: waiting for it is sooner than a fork
                try:
                    self._reply_spare()
                except (OSError, ValueError):
                    self._spare_asked = False  # none came: fork below
            while self._spares:
                pid, spare = self._spares.pop()
                try:
                    spare.sendmsg([data], rights)
                except OSError:  # it died: the zygote reaps it
                    with contextlib.suppress(OSError):
                        self._send({"op": "reap", "pid": pid, "wait": False})
                    continue
                finally:
                    spare.close()
                return self._started(pid)
            try:
                self._sock.sendmsg([data], rights)
                reply = self._reply()
            except (OSError, ValueError) as e:
                reply = {"error": str(e) or type(e).__name__}
            forked = reply.get("pid")
            if not isinstance(forked, int) or forked <= 0:
                self.state = "dead"
                self.why = f"fork failed: {reply.get('error', reply)}"
            else:
                return self._started(forked)
        self._dead(self.why)
        raise WarmUnavailable(self.why)

    def _started(self, pid: int) -> int:
        """Count a call's child, and ask for the next call's spare (forked
        while this call runs) unless one is held or on its way."""
        self.calls += 1
        self._children.add(pid)
        if not self._spares and not self._spare_asked:
            with contextlib.suppress(OSError):
                self._send({"op": "spare"})
                self._spare_asked = True
        return pid

    def reap(self, pid: int, wait: bool = True) -> int | None:
        """Reap child ``pid`` (it has exited); its exit status, None if it was
        lost.  ``wait=False``: the child said its status (``EXIT_MARK``) and
        was killed; the zygote reaps it when its exit ends, and this returns
        at once (None)."""
        with self._lock:
            status: int | None = None
            if self._sock is not None:
                try:
                    self._send({"op": "reap", "pid": pid, "wait": wait})
                    if wait:
                        status = self._reply().get("status")
                except (OSError, ValueError):
                    pass
            self._children.discard(pid)
            drained = self.state == "draining" and not self._children
        if drained:
            self._close()
        return status if isinstance(status, int) else None

    # -- the control socket (under self._lock) -----------------------------------------

    def _send(self, doc: dict[str, Any]) -> None:
        if self._sock is not None:
            self._sock.send(json.dumps(doc).encode())

    def _reply(self) -> dict[str, Any]:
        """The zygote's answer to the request just sent (spares that come first are kept)."""
        while True:
            doc = self._receive()
            if doc is None:
                raise OSError("the warm parent is gone")
            if "spare" not in doc:
                return doc

    def _reply_spare(self) -> None:
        """Wait for the spare the zygote is forking."""
        while self._spare_asked:
            doc = self._receive()
            if doc is None:
                raise OSError("the warm parent is gone")
            if "spare" not in doc:
                log.warning("warm parent of %s: unexpected message %.200s", self.plugin, doc)

    def _take_spares(self) -> None:
        """Keep the spares the zygote sent (without waiting for any)."""
        while self._poll is not None and self._poll.poll(0):
            doc = self._receive()
            if doc is None:
                return
            if "spare" not in doc:
                log.warning("warm parent of %s: unexpected message %.200s", self.plugin, doc)

    def _receive(self) -> dict[str, Any] | None:
        """One message of the zygote (None at its end); a spare is kept."""
        assert self._sock is not None
        fds = array.array("i")
        data, anc, _flags, _addr = self._sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        doc = json.loads(data)
        if not isinstance(doc, dict):
            doc = {"error": f"not a message: {str(doc)[:200]}"}
        spare = doc.get("spare")
        if spare is not None:
            self._spare_asked = False  # it came, or it could not be forked (0)
        if isinstance(spare, int) and spare > 0 and len(fds) == 1:
            self._spares.append((spare, socket.socket(fileno=fds[0])))
        else:
            for fd in fds:
                os.close(fd)
        return doc

    def spare(self) -> int:
        """The pid of a child forked ahead for the next call (0: none)."""
        with self._lock:
            if self._sock is not None and self.state == "ready":
                with contextlib.suppress(OSError, ValueError):
                    self._take_spares()
            return self._spares[-1][0] if self._spares else 0

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


def env_change(base: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
    """``env`` as a change to ``base``, the environment a zygote was started
    with: ``{"set": {what differs}, "unset": [what is gone]}``.  A call's
    environment is mostly its zygote's; sending all of it cost each call the
    encoding, decoding and comparing of 40 variables (~0.3 ms)."""
    return {
        "set": {k: v for k, v in env.items() if base.get(k) != v},
        "unset": [k for k in base if k not in env],
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
    """The zygotes of one dispatcher, one per plugin executable (and, while it
    starts, the successor of one worn by its calls or growth)."""

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
        self._successors: dict[Path, Zygote] = {}
        self._doomed: list[Zygote] = []  # successors started before their files changed
        self._retired: list[Zygote] = []
        self._failed: dict[Path, float] = {}  # when a zygote of a plugin could not start
        self._closed = False

    def spawner(self, plugin: Path) -> Zygote | None:
        """A ready zygote for ``plugin``, or None (then one is started for later calls).

        A worn zygote forks until its successor is ready, then retires: a
        replacement every ``max_calls`` calls sent no call to exec (at 8
        clients, a replacement's ~0.3 s of exec'd calls cost 6% of the
        calls/s).  One whose files changed, or that died, forks no more: the
        calls run by exec until a new one is ready.  After a zygote that could
        not start (a plugin that does not compile, no process to be had), the
        calls run by exec for ``START_BACKOFF`` seconds before another is
        tried, not one start per call."""
        with self._lock:
            for d in [d for d in self._doomed if d.state != "starting"]:
                self._doomed.remove(d)
                self._retire(d, "a file it loaded changed while it started")
            z = self._current.get(plugin)
            succ = self._successors.get(plugin)
            if succ is not None and succ.state != "starting" and z is not None:
                del self._successors[plugin]
                why, may_fork = z.stale(self.max_calls, self.max_growth)
                if succ.state == "ready" and may_fork:  # it takes over
                    self._retire(z, why or "worn")
                    z = self._current[plugin] = succ
                else:  # it failed (the worn one goes on), or may hold the old files
                    self._note_failure(plugin, succ)
                    self._retire(succ, f"its predecessor is stale at once ({why})")
            if z is not None and z.state == "starting":
                return None
            if z is not None:
                why, may_fork = z.stale(self.max_calls, self.max_growth)
                if not why:
                    return z
                if may_fork:
                    if plugin not in self._successors and self._may_start(plugin):
                        self._start(plugin, self._successors)
                    return z
                if plugin in self._successors:  # it may have loaded the old files
                    self._doomed.append(self._successors.pop(plugin))
                self._note_failure(plugin, z)
                if z.state == "dead" and not self._may_start(plugin):
                    return None  # kept meanwhile: the status shows why it failed
                del self._current[plugin]
                self._retire(z, why)
            if self._may_start(plugin):
                self._start(plugin, self._current)
        return None

    def _note_failure(self, plugin: Path, z: Zygote) -> None:
        if z.state == "dead" and not z.was_ready:
            self._failed[plugin] = z.ended

    def _may_start(self, plugin: Path) -> bool:
        failed = self._failed.get(plugin)
        recent = failed is not None and time.monotonic() - failed < START_BACKOFF
        return not self._closed and not recent

    def _start(self, plugin: Path, into: dict[Path, Zygote]) -> None:
        """Start a zygote of ``plugin`` in the background, kept in ``into``."""
        interp = interpreter(plugin, self.own)
        if interp is None or not interp.python:
            return
        z = into[plugin] = Zygote(plugin, interp.argv, self.env)
        threading.Thread(target=z.start, daemon=True, name=f"zygote {plugin.name}").start()

    def _retire(self, z: Zygote, why: str) -> None:
        if z.state != "dead":
            self._retired.append(z)
            z.retire(why)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            self._retired = [z for z in self._retired if z.state == "draining"]
            zs = [*self._current.values(), *self._successors.values(), *self._doomed]
            return [z.as_struct() for z in [*zs, *self._retired]]

    def close(self, wait: float = 5.0) -> None:
        """Retire every zygote, and wait (bounded) for those with no child left to exit."""
        with self._lock:
            self._closed = True
            zs = [*self._current.values(), *self._successors.values(), *self._doomed]
            zs += self._retired
            self._current.clear()
            self._successors.clear()
            self._doomed.clear()
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
