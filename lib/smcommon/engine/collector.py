"""The collector process of an SR: started detached, one at a time, stoppable.

This module owns the collector's process life and its files in the SR's
metadata directory (so that, on an SR several hosts share, one collector at
a time runs on any of them)::

    .sm/locks/gc.lock     the single-instance lock (an fcntl OFD record lock,
                          which NFS carries to the server: held while it runs)
    .sm/gc-request        a token: a new value asks for another pass
    .sm/gc-done           the token the last complete pass started with
    .sm/gc-progress.json  what the running collector does (Query.diagnostics)

and, per host, ``<run_dir>/gc/<sr>.json`` (the pid and start time of the
collector this host started, for SR.detach to stop it).

Start: ``request(eng)`` (VDI.destroy, compose, set_persistent, after the SR
lock is released) writes a new request token, then, if no collector holds
the instance lock, starts ``python -m smcommon.engine.collector SR SR_DIR``
detached (``runner.spawn_detached``: a double fork; it outlives the call).
The collector takes the lock (or exits: one is running and will see the
token), then runs passes (``gc.Collector``) until a pass starts and ends with
the same token; it releases the lock, and looks at the token once more
(a request written after its last look would otherwise find the lock still
held and be lost).

Stop: ``stop(eng)`` (SR.detach, SR.destroy) sends SIGTERM; the collector
stops at the next batch of its copy or the next lock wait (the journal keeps
its place) and exits; after ``STOP_TIMEOUT`` seconds it is killed (SIGKILL is
safe: every step is journaled).  Recovery: the next pass (any process)
finishes a switch left half done, and the collector resumes a copy from its
journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from smcommon import lock, timestamps
from smcommon.engine import gc, locks
from smcommon.errors import Error, LockTimeout
from smcommon.fileio import atomic_write

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from smcommon.engine.sr import SrEngine

log = logging.getLogger(__name__)

LOCK = "gc.lock"
REQUEST = "gc-request"
DONE = "gc-done"
PROGRESS = "gc-progress.json"
STOP_TIMEOUT = 10.0  # seconds SR.detach waits for the collector to stop, then kills it
FOREGROUND_WAIT = 600.0  # seconds SR.gc waits for a running collector's pass
PROGRESS_EVERY = 0.5  # seconds between progress file updates


def _sm(eng: SrEngine) -> Path:
    return eng.meta.sm_dir


def _write_token(eng: SrEngine, name: str = REQUEST, token: str | None = None) -> str:
    token = os.urandom(8).hex() if token is None else token
    path = _sm(eng) / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    # a hint only: a crash may lose it (the next change writes another), so no fsync
    tmp.write_text(token)
    os.replace(tmp, path)
    return token


def read_token(eng: SrEngine, name: str = REQUEST) -> str:
    try:
        return (_sm(eng) / name).read_text()
    except OSError:
        return ""


def idle(eng: SrEngine) -> bool:
    """No collector runs and every request has had its pass."""
    return not running(eng) and read_token(eng, DONE) == read_token(eng)


def _open_lock(eng: SrEngine) -> int:
    d = eng.store.shared_lock_dir()
    d.mkdir(parents=True, exist_ok=True)
    return os.open(d / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(fd: int) -> bool:
    """The instance lock on ``fd`` now, or False; released by closing ``fd``."""
    return lock.flock_wait(fd, shared=False, timeout=0, record=True)


def running(eng: SrEngine) -> bool:
    """Whether a collector (of any host sharing the SR) holds the lock now."""
    try:
        fd = _open_lock(eng)
    except (Error, OSError):
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)  # an OFD lock taken here goes with its descriptor


def request(eng: SrEngine) -> None:
    """Ask for a collection: a new token, and a collector if none runs.
    Never fails the caller's call (the garbage waits for the next request)."""
    try:
        _write_token(eng)
        if not running(eng):
            start(eng)
    except (Error, OSError) as e:
        log.warning("could not start the collector of SR %s: %s", eng.sr, e)


def start(eng: SrEngine) -> int:
    from smcommon import runner

    lib = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [lib, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env["SM_ROOT"] = str(eng.paths.root)
    argv = [sys.executable, "-m", "smcommon.engine.collector", eng.sr, str(eng.sr_dir)]
    if eng.type_module:  # the SR type makes its own store (lvmoiscsi's LVStore)
        argv.append(eng.type_module)
    pid = runner.spawn_detached(argv, env=env, cwd="/")
    log.info("started the collector of SR %s (pid %d)", eng.sr, pid)
    return pid


# --- this host's collector process -----------------------------------------------


def _pid_file(eng: SrEngine) -> Path:
    return eng.paths.run_dir / "gc" / f"{eng.sr}.json"


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def stop(eng: SrEngine, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop this host's collector of the SR, waiting at most ``timeout``
    seconds before SIGKILL.  True if one was running."""
    path = _pid_file(eng)
    try:
        doc = json.loads(path.read_text())
        pid, started = int(doc["pid"]), str(doc["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if _start_time(pid) != started:
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    log.info("stopping the collector of SR %s (pid %d)", eng.sr, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(0.02)
    if _start_time(pid) == started:
        log.warning(
            "the collector of SR %s did not stop in %gs: killed", eng.sr, timeout
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _start_time(pid) == started and time.monotonic() < deadline:
            time.sleep(0.02)
    with contextlib.suppress(OSError):
        path.unlink()
    return True


class ProgressFile(gc.Progress):
    """The collector's progress, in the SR for Query.diagnostics."""

    def __init__(self, eng: SrEngine) -> None:
        self.path = _sm(eng) / PROGRESS
        self.doc: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": timestamps.now(),
            "step": "starting",
            "done": 0,
            "total": 0,
            "rate": 0.0,
        }
        self._copy_start = 0.0
        self._last = 0.0
        self._write()

    def _write(self) -> None:
        self.doc["updated"] = time.time()
        with contextlib.suppress(OSError):
            atomic_write(self.path, json.dumps(self.doc).encode())
        self._last = time.monotonic()

    def step(self, text: str) -> None:
        self.doc.update(step=text, done=0, total=0, rate=0.0)
        self._copy_start = time.monotonic()
        self._write()

    def copied(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self._copy_start
        self.doc.update(
            done=done, total=total, rate=done / elapsed if elapsed > 0 else 0.0
        )
        if time.monotonic() - self._last >= PROGRESS_EVERY or done >= total:
            self._write()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def progress_of(eng: SrEngine) -> dict[str, Any] | None:
    """The running collector's progress (None if none runs)."""
    try:
        doc = json.loads((_sm(eng) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not running(eng):
        return None
    return doc


# --- the collector itself ---------------------------------------------------------


def run_foreground(eng: SrEngine, wait: float = FOREGROUND_WAIT) -> gc.Report:
    """SR.gc: a pass in this process, once no collector process runs one."""
    fd = _open_lock(eng)
    try:
        if not lock.flock_wait(fd, shared=False, timeout=wait, record=True):
            raise LockTimeout(f"the collector of SR {eng.sr}", wait)
        token = read_token(eng)
        rep = gc.Collector(eng, lock_wait=locks.default_timeout()).run()
        if not rep.stopped:
            _write_token(eng, DONE, token)
        return rep
    finally:
        os.close(fd)


def serve(eng: SrEngine) -> int:
    """The collector process: passes until no new request; 0 when done."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fd = _open_lock(eng)
    if not _try_lock(fd):
        os.close(fd)
        return 0  # another collector runs: it will see the request
    pid_file = _pid_file(eng)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        pid_file,
        json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}).encode(),
    )
    progress = ProgressFile(eng)
    try:
        while True:
            token = read_token(eng)
            if eng.still_attached is not None and not eng.still_attached():
                break
            rep = gc.Collector(eng, lambda: stopping, progress).run()
            if stopping or rep.stopped:
                break
            _write_token(eng, DONE, token)
            if read_token(eng) != token:
                continue
            os.close(fd)  # releases the lock
            fd = _open_lock(eng)
            if read_token(eng) != token and _try_lock(fd):
                continue
            break
    finally:
        progress.close()
        with contextlib.suppress(OSError):
            pid_file.unlink()
        os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    from smcommon import log as smlog
    from smcommon.engine.host import HostRegistry
    from smcommon.engine.meta import Metadata
    from smcommon.engine.sr import SrEngine
    from smcommon.paths import Paths, safe_name

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m smcommon.engine.collector SR SR_DIR [TYPE_MODULE]",
              file=sys.stderr)
        return 2
    paths = Paths.from_env()
    sr, sr_dir = safe_name("sr", args[0]), Path(args[1])
    context = smlog.setup(paths.log_file, "sm-gc")
    context.dbg = f"gc-{sr[:8]}"
    try:
        doc = Metadata(sr_dir).read_sr()
        if doc is None or doc.get("sr") != sr:
            log.warning("collector: %s does not hold SR %s; not collecting", sr_dir, sr)
            return 1
        registry = HostRegistry(paths)
        store = _type_store(args[2], paths, sr, sr_dir) if len(args) == 3 else None
        eng = SrEngine(
            paths,
            sr,
            sr_dir,
            store=store,
            still_attached=lambda: registry.get(sr) is not None,
            type_module=args[2] if len(args) == 3 else None,
        )
        return serve(eng)
    except Error as e:
        log.warning("collector of SR %s: %s", sr, e)
        return 1
    except Exception:
        log.exception("collector of SR %s failed", sr)
        return 1


def _type_store(module_file: str, paths: Any, sr: str, sr_dir: Path) -> Any:
    """The store of an SR whose type makes its own (``Driver.store``): the
    type's plugin module (``factory(paths).driver()``) loaded from its file."""
    import importlib.util

    path = Path(module_file)
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"{module_file}: not an SR type's module")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # its sibling modules
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{module_file}: cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module.factory(paths).driver().store(sr, sr_dir)


if __name__ == "__main__":
    sys.exit(main())
