"""A warm parent ("zygote"): a plugin's imports done once, one forked child per call.

Run by the dispatcher (``dispatcher.warm``) as ``<interpreter> [plugin's
interpreter flags] zygote.py <plugin>``, with the control socket (a
SOCK_SEQPACKET socketpair end) as fd 3, stdin and stdout on /dev/null and
stderr the dispatcher's.  Standard library only: it runs under the plugin's own
flags (``-S``, ``-I``), where nothing else may be importable.

Start-up: ``sys.argv`` and ``sys.path[0]`` as a run of the plugin script would
have them; the plugin's top-level imports (and those in top-level ``try``
blocks) are imported, then every module named by a ``WARM_IMPORTS`` list of an
imported module (``plugins/ext/ext_driver.py`` names the engine).  It then
runs the call its runtime offers (``WARM_REHEARSAL``: ``smcommon.plugin``'s
Query.query) through the plugin's code ten times (``rehearse``), so that
what a call's first run does once is done before the first fork.  It runs no
thread and holds no lock, file or SR state.  It then sends ``{"ready": pid,
"files": [...]}`` (the module files a change of which makes it stale) and
serves, one message at a time:

- The spare: a child forked ahead, so that a call waits for no fork (~1 ms
  here) and for no exchange with the zygote.  The zygote sends ``{"spare":
  pid}`` with the descriptor of the spare's socket (``{"spare": 0}`` if it
  could not fork) once it is ready, and again when asked: ``{"op":
  "spare"}`` (the dispatcher asks as it starts a call and holds no spare).
  The spare does what does not depend on the call (``_prepare``: group
  leader, every descriptor but its socket closed, signal mask, ``random``)
  and waits on its socket; the dispatcher sends it a call as it would send a
  fork (below); at the end of the socket it exits.  (Running one call's
  path in the spare beforehand, to copy the pages every call writes, saved
  ~0.3 ms per call for ~2 ms of CPU: on 2 cores it cost a fifth of the
  calls per second, so it is not done.)
- ``{"op": "fork", "set": {...}, "unset": [...], "cwd": ..., "umask": ...}``
  with three file descriptors (the call's stdin, stdout, stderr), when the
  dispatcher has no spare: forks a child and answers ``{"pid": N}``.  The child (forked now or
  a spare), before it runs the plugin's code as ``__main__``: is a process
  group leader; gets the three descriptors as 0, 1, 2 and no other
  (everything else is closed); a fresh environment, cwd and umask; the
  signal dispositions of a newly started interpreter (set once in the
  zygote, inherited) and an empty signal mask; new ``sys.std*`` streams; a
  reseeded ``random``; logging without handlers (``logging.shutdown`` of what
  the zygote had: nothing).  The call's environment comes as a change to
  the one the zygote was started with (``set``, ``unset``: mostly nothing;
  sending and setting 40 variables anew cost 0.3-0.5 ms here).  When the
  plugin's code, ``atexit`` handlers and flushing are done, it writes
  ``EXIT_MARK`` with its status to stderr, closes every descriptor and exits
  with that status: the dispatcher answers on the mark, without waiting for
  the exit's teardown of the address space (1.5 ms here).
- ``{"op": "reap", "pid": N}``: the child has exited (the dispatcher saw its
  pidfd): waits for it and answers ``{"pid": N, "status": <exit code,
  negative for a signal>}``.  With ``"wait": false`` (the dispatcher had the
  status from the mark and killed the group): no answer; reaped within
  ``REAP_POLL`` of its end.  Children are reaped only when asked, so the
  dispatcher can signal a finished call's process group before its leader's
  pid may be reused.
- end of file (the dispatcher is gone or retires this zygote): exits; the
  children it did not reap are reaped by init.
"""

from __future__ import annotations

import array
import ast
import contextlib
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time
import types

CONTROL_FD = 3
MAX_MSG = 1 << 20
# The last bytes a finished child writes to stderr before it closes every
# descriptor and exits (dispatcher.child reads its status from them)
EXIT_MARK = b"\0smcommon-zygote-exit:%d\0"
REAP_POLL = 0.02  # seconds between two looks at children asked to be reaped later


def _plugin_imports(tree: ast.Module) -> list[str]:
    """Modules imported at the top level of a plugin script (or in a top-level try)."""
    names: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
                names.extend(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return names


def _warm(names: list[str]) -> None:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        mod = None
        with contextlib.suppress(Exception):  # an attribute, not a module; or it fails: the call says
            mod = importlib.import_module(name)
        extra = getattr(mod, "WARM_IMPORTS", None)
        if isinstance(extra, (list, tuple)):
            todo.extend(str(x) for x in extra)


def _own_files(plugin: str) -> list[str]:
    """The files whose change makes this zygote stale: the plugin and every
    imported module outside the interpreter's standard library."""
    import sysconfig

    paths = sysconfig.get_paths()
    stdlib = tuple(
        os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if k in paths
    )
    files = {os.path.realpath(plugin)}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str):
            real = os.path.realpath(f)
            if not real.startswith(stdlib) or "site-packages" in real:
                files.add(real)
    return sorted(files)


def _send(sock: socket.socket, doc: dict[str, object]) -> None:
    sock.send(json.dumps(doc).encode())


def _prepare(spare: socket.socket | None) -> None:
    """In a new child, before its call is known: what every exec'd plugin
    has, whatever its call: a process group of its own, no descriptor beyond
    0-2 (a spare keeps its socket; ``_child`` closes what came with the call),
    an empty signal mask (the dispositions are fresh since ``serve``), a
    reseeded ``random``.  A spare does this while it waits, so that its call
    does not."""
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if spare is not None:
        os.closerange(3, spare.fileno())
        os.closerange(spare.fileno() + 1, MAX_FD)
        # a stream opened and closed now copies the pages of the io objects
        # that the call's three streams touch while the spare waits, not in
        # the call (0.27 -> 0.15 ms from the call's arrival to its code, traced)
        for mode in ("r", "w"):
            open(os.devnull, mode).close()
    if "random" in sys.modules:
        sys.modules["random"].seed()


def _child(code: types.CodeType, plugin: str, req: dict[str, object], fds: list[int]) -> None:
    """In the forked child, once ``_prepare``d: become what an exec'd plugin
    would be for this call, then run it."""
    status = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # dup2 clears O_CLOEXEC on the copy
        os.closerange(3, MAX_FD)  # the descriptors as received, a spare's socket
        os.chdir(str(req.get("cwd") or "/"))
        os.umask(int(req.get("umask", 0o022)))  # type: ignore[call-overload]
        _change_environment(req.get("unset"), req.get("set"))
        namespace = _as_a_run(plugin)
        sys.argv = [plugin]
        try:
            exec(code, namespace)  # noqa: S102 -- the plugin's own code, as `python plugin` runs it
            status = 0
        except SystemExit as e:
            status = _exit_status(e.code)
        except BaseException:  # noqa: BLE001 -- as an uncaught exception ends a script
            import traceback

            traceback.print_exc()
            status = 1
        with contextlib.suppress(BaseException):
            import atexit

            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):  # the reader went away
                stream.flush()
        # done: say so, and close everything, so the dispatcher answers now
        # rather than after the exit's teardown of the address space (~1.5 ms)
        with contextlib.suppress(OSError):
            os.write(2, EXIT_MARK % status)
        os.closerange(0, MAX_FD)
    finally:
        os._exit(status)


def _as_a_run(plugin: str) -> dict[str, object]:
    """``sys.std*`` on descriptors 0-2 and a new ``__main__`` module, as a run
    of ``plugin`` has them (a call's child, and each rehearsal of one): the
    namespace to run its code in."""
    sys.stdin = open(0, encoding=None, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", 1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    main = types.ModuleType("__main__")
    main.__file__ = plugin
    main.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    return main.__dict__


def _change_environment(unset: object, changed: object) -> None:
    """The call's environment: the zygote's (the one it was started with, as
    its imports left it, as an exec'd plugin's imports leave theirs) less
    ``unset`` and with ``changed`` set (what the dispatcher found different,
    ``warm.env_change``: mostly nothing)."""
    if isinstance(unset, list):
        for key in unset:
            os.environ.pop(str(key), None)
    if isinstance(changed, dict):
        for key, value in changed.items():
            os.environ[str(key)] = str(value)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1


def _fresh_signals() -> None:
    """The dispositions and mask of a newly started interpreter."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 65536


MAX_FD = _max_fd()  # the zygote's limit, which its children inherit


def _fork_spare(
    code: types.CodeType, plugin: str, control: socket.socket
) -> tuple[int, socket.socket] | None:
    """Fork a spare child; its pid and our end of its socket (None: no fork)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        control.close()
        ours.close()
        _wait_for_call(code, plugin, theirs)
    theirs.close()
    return pid, ours


def _wait_for_call(code: types.CodeType, plugin: str, sock: socket.socket) -> None:
    """In a spare child: prepare, wait for the call (or the end of the zygote), run it."""
    try:
        _prepare(sock)
        data, fds = _receive(sock)
    except BaseException:  # noqa: BLE001 -- nothing to run
        os._exit(0)
    if not data or len(fds) != 3:
        os._exit(0)
    try:
        req = json.loads(data)
    except ValueError:
        req = {}
    _child(code, plugin, req if isinstance(req, dict) else {}, list(fds))


def _receive(sock: socket.socket) -> tuple[bytes, array.array[int]]:
    """One message and the file descriptors that came with it."""
    fds = array.array("i")
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(3 * fds.itemsize))
            break
        except InterruptedError:
            continue
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    return data, fds


def load(plugin: str) -> types.CodeType:
    """The plugin's code, with ``sys.argv`` and ``sys.path[0]`` as a run of
    it would have them and everything a call imports imported."""
    with open(plugin, "rb") as f:
        source = f.read()
    code = compile(source, plugin, "exec")
    sys.argv = [plugin]
    sys.path[0] = os.path.dirname(os.path.realpath(plugin))
    _warm(_plugin_imports(ast.parse(source, plugin)))
    return code


# runs of the rehearsal: the first does most; by the tenth, every function a
# call runs once has passed 3.11's warm-up (8 calls) and is specialised here,
# not in each child (a Query.query child copied ~340 pages after 3, ~310 after 10)
REHEARSALS = 10


def rehearse(code: types.CodeType, plugin: str, times: int = REHEARSALS) -> None:
    """Run the request an imported module offers as ``WARM_REHEARSAL`` (bytes;
    ``smcommon.plugin`` offers a Query.query) through the plugin's code in
    this process, as a child would, and put back what that changed
    (descriptors 0-2, ``sys.std*``, ``__main__``, umask, environment,
    ``sys.path``; the answer goes to /dev/null).  A plugin whose modules offer none is not
    rehearsed: only its runtime knows which call is free of side effects.

    What a call's first run does once and keeps (bytecode specialised in
    place, caches filled, objects made on first use) is then done in the
    zygote, not again in every child, where it also copies the pages it
    writes: a warm Query.query child ran 2.2 -> 1.7 ms, 470 -> 370 page
    copies."""
    body = next(
        (b for m in list(sys.modules.values())
         if isinstance(b := getattr(m, "__dict__", {}).get("WARM_REHEARSAL"), bytes)),
        None,
    )  # fmt: skip
    if body is None:
        return
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    environ = dict(os.environ)
    path = list(sys.path)  # a plugin script puts its directory in front, each run
    streams = sys.stdin, sys.stdout, sys.stderr
    main = sys.modules.get("__main__")
    mask = os.umask(0o022)
    try:
        for _ in range(times):
            r, w = os.pipe()
            os.write(w, body)  # far below a pipe's capacity
            os.close(w)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(r, 0)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(r)
            os.close(null)
            namespace = _as_a_run(plugin)
            with contextlib.suppress(BaseException):  # a rehearsal never stops the zygote
                exec(code, namespace)  # noqa: S102 -- as a child runs it
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    stream.flush()
    finally:
        for fd, copy in enumerate(saved):
            os.dup2(copy, fd)
            os.close(copy)
        sys.stdin, sys.stdout, sys.stderr = streams
        if main is not None:
            sys.modules["__main__"] = main
        os.umask(mask)
        sys.path[:] = path
        if os.environ != environ:
            os.environ.clear()
            os.environ.update(environ)


def serve(plugin: str) -> int:
    sock = socket.socket(fileno=CONTROL_FD)
    code = load(plugin)
    rehearse(code, plugin)
    # once, here (after the imports, which may set handlers): every child
    # inherits these dispositions, and only its mask is reset
    _fresh_signals()
    # what is imported now lives as long as the zygote: keep it out of the
    # collector's scans, so children do not copy its pages by touching them
    gc.collect()
    gc.freeze()
    _send(sock, {"ready": os.getpid(), "files": _own_files(plugin)})
    later: set[int] = set()  # exited or exiting children the dispatcher is done with
    handed: set[int] = set()  # spares given to the dispatcher and not reaped

    def give_spare() -> None:
        got = _fork_spare(code, plugin, sock)
        if got is None:  # say so: the dispatcher waits for the spare it asked for
            with contextlib.suppress(OSError):
                _send(sock, {"spare": 0})
            return
        pid, end = got
        try:
            sock.sendmsg(
                [json.dumps({"spare": pid}).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [end.fileno()]))],
            )
        except OSError:
            pass  # the dispatcher is gone: the spare sees the end of its socket
        finally:
            end.close()
            handed.add(pid)

    give_spare()
    try:
        while True:
            _reap_finished(later)
            sock.settimeout(REAP_POLL if later else None)
            try:
                data, fds = _receive(sock)
            except TimeoutError:
                continue
            except OSError:
                return 0
            if not data:
                return 0  # the dispatcher is gone, or retires us
            try:
                req = json.loads(data)
            except ValueError:
                req = {}
            op = req.get("op") if isinstance(req, dict) else None
            if op == "fork" and len(fds) == 3:
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _prepare(None)
                    _child(code, plugin, req, list(fds))
                for fd in fds:
                    os.close(fd)
                _send(sock, {"pid": pid})
            elif op == "reap":
                pid = int(req.get("pid", 0))
                handed.discard(pid)
                if req.get("wait", True) is not False:
                    try:
                        _pid, st = os.waitpid(pid, 0)
                        _send(sock, {"pid": pid, "status": os.waitstatus_to_exitcode(st)})
                    except ChildProcessError:
                        _send(sock, {"pid": pid, "error": "not a child of this zygote"})
                else:  # no answer: the dispatcher has the status (EXIT_MARK)
                    with contextlib.suppress(ChildProcessError):
                        if not os.waitpid(pid, os.WNOHANG)[0]:
                            later.add(pid)
            elif op == "spare":
                give_spare()
            else:
                for fd in fds:
                    os.close(fd)
                _send(sock, {"error": f"bad request: {str(req)[:200]}"})
    finally:
        for pid in later:  # killed by the dispatcher before it asked
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        _reap_spares(handed)


def _reap_spares(pids: set[int], wait: float = 1.0) -> None:
    """Reap the spares that end with us (their socket ended); one that took a
    call and outlives us (the dispatcher died) is left to init."""
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        _reap_finished(pids)
        if pids:
            time.sleep(0.005)


def _reap_finished(pids: set[int]) -> None:
    for pid in list(pids):
        try:
            done, _st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            pids.discard(pid)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: zygote.py PLUGIN (started by the dispatcher)", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(sys.argv[1]))
