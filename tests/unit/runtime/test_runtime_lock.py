"""smcommon.lock: flock locks between processes, bounded waits, nesting, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from smcommon import lock
from smcommon.errors import InvalidRequest, LockTimeout
from smcommon.paths import Paths

# A child that takes a lock, says so on stdout, then waits for stdin to close.
HOLDER = """
import sys
from smcommon import lock
lk = lock.Lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == "shared", timeout=10)
lk.acquire()
print("held", flush=True)
sys.stdin.read()
"""

# A child that adds 1 to a counter file N times, each under the lock.
COUNTER = """
import sys
from smcommon import lock
name, lock_dir, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for _ in range(n):
    with lock.Lock(name, lock_dir, timeout=60):
        with open(path) as f:
            value = int(f.read())
        with open(path, "w") as f:
            f.write(str(value + 1))
"""


class Holder:
    """A child process holding a lock until stopped (or killed)."""

    def __init__(self, name: str, lock_dir: Path, shared: bool = False) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                HOLDER,
                name,
                str(lock_dir),
                "shared" if shared else "excl",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "held\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def holders():
    made: list[Holder] = []
    yield made
    for h in made:
        if h.proc.poll() is None:
            h.proc.kill()
        h.stop()


def test_lock_files_live_under_the_lock_dir(tmp_path):
    paths = Paths.from_env(tmp_path)
    with lock.sr_lock(paths, "sr1") as a, lock.vdi_lock(paths, "sr1", "v1") as b:
        assert a.held and b.held
        assert Path(a.path) == tmp_path / "run/sm/lock/sr/sr1.lock"
        assert Path(b.path) == tmp_path / "run/sm/lock/vdi/sr1/v1.lock"
    assert not a.held and not b.held


@pytest.mark.parametrize(
    "name", ["..", "sr/..", "a//b", "", "/etc/passwd", "a\0b", "x" * 200, ".x"]
)
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidRequest):
        lock.Lock(name, tmp_path)
    with pytest.raises(InvalidRequest):
        lock.vdi_lock(Paths.from_env(tmp_path), "sr", name)
    assert list(tmp_path.iterdir()) == []


def test_exclusive_lock_times_out_against_another_process(tmp_path, holders):
    holders.append(Holder("sr/a", tmp_path))
    with pytest.raises(LockTimeout) as e:
        lock.Lock("sr/a", tmp_path, timeout=0.2).acquire()
    assert e.value.name == "sr/a"
    assert e.value.code == "LOCK_TIMEOUT"
    assert "could not take lock sr/a within 0.2s" in str(e.value)
    # another name is independent
    with lock.Lock("sr/b", tmp_path, timeout=0.2):
        pass


def test_waiter_gets_the_lock_when_the_holder_lets_go(tmp_path, holders):
    h = Holder("sr/a", tmp_path)
    holders.append(h)
    got = threading.Event()

    def wait_for_it():
        with lock.Lock("sr/a", tmp_path, timeout=30):
            got.set()

    t = threading.Thread(target=wait_for_it)
    t.start()
    assert not got.wait(0.2)  # still held by the child
    h.stop()
    t.join(30)
    assert got.is_set()


def test_shared_locks_share_and_exclude_exclusive(tmp_path, holders):
    holders.append(Holder("sr/a", tmp_path, shared=True))
    with lock.Lock("sr/a", tmp_path, shared=True, timeout=0.2):
        pass
    with pytest.raises(LockTimeout):
        lock.Lock("sr/a", tmp_path, timeout=0.2).acquire()


def test_exclusive_holder_excludes_shared(tmp_path, holders):
    holders.append(Holder("sr/a", tmp_path))
    with pytest.raises(LockTimeout):
        lock.Lock("sr/a", tmp_path, shared=True, timeout=0.2).acquire()


def test_kill_9_of_the_holder_frees_the_lock(tmp_path, holders):
    h = Holder("sr/a", tmp_path)
    holders.append(h)
    with pytest.raises(LockTimeout):
        lock.Lock("sr/a", tmp_path, timeout=0.1).acquire()
    os.kill(h.proc.pid, signal.SIGKILL)
    h.proc.wait(timeout=30)
    with lock.Lock("sr/a", tmp_path, timeout=10) as lk:
        assert lk.held


def test_two_threads_exclude_each_other(tmp_path):
    first = lock.Lock("sr/a", tmp_path)
    first.acquire()
    errors: list[BaseException] = []

    def other():
        try:
            lock.Lock("sr/a", tmp_path, timeout=0.2).acquire()
        except LockTimeout as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join(30)
    first.release()
    assert len(errors) == 1


def test_nesting_in_one_thread(tmp_path):
    paths = Paths.from_env(tmp_path)
    outer = lock.sr_lock(paths, "s", timeout=0.2)
    with outer:
        with lock.vdi_lock(paths, "s", "v", timeout=0.2):
            with (
                lock.sr_lock(paths, "s", timeout=0.2),
                lock.sr_lock(paths, "s", shared=True),
            ):
                assert outer.held
            assert outer.held  # inner releases do not unlock
        # still held against other processes
        code = "import sys; from smcommon import lock; lock.Lock('sr/s', sys.argv[1], timeout=0.1).acquire()"
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "run/sm/lock")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "LockTimeout" in out.stderr
    with lock.sr_lock(paths, "s", timeout=0.2):
        pass


def test_exclusive_inside_shared_is_refused(tmp_path):
    with lock.Lock("sr/a", tmp_path, shared=True), pytest.raises(lock.LockUpgrade):
        lock.Lock("sr/a", tmp_path).acquire()


def test_release_is_idempotent_and_reacquire_of_a_held_object_is_a_bug(tmp_path):
    lk = lock.Lock("sr/a", tmp_path)
    lk.acquire()
    with pytest.raises(RuntimeError):
        lk.acquire()
    lk.release()
    lk.release()
    assert not lk.held
    assert "free" in repr(lk)


def test_no_descriptor_leaks(tmp_path):
    me = psutil.Process()
    before = me.num_fds()
    for _ in range(50):
        with lock.Lock("sr/a", tmp_path), lock.Lock("sr/b", tmp_path, shared=True):
            pass
    try:
        with lock.Lock("sr/a", tmp_path), lock.Lock("sr/a", tmp_path, timeout=0):
            pass
    except lock.LockUpgrade:
        pass
    assert me.num_fds() == before


def test_parallel_processes_never_lose_an_update(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    n, procs = 40, 6
    children = [
        subprocess.Popen(
            [sys.executable, "-c", COUNTER, "sr/c", str(tmp_path), str(counter), str(n)]
        )
        for _ in range(procs)
    ]
    for c in children:
        assert c.wait(timeout=120) == 0
    assert int(counter.read_text()) == n * procs


def test_a_forked_child_does_not_inherit_the_parents_holding(tmp_path):
    parent = lock.Lock("sr/a", tmp_path)
    with parent:
        pid = os.fork()
        if pid == 0:  # the child: the lock is the parent's, so this must time out
            code = 1
            try:
                lock.Lock("sr/a", tmp_path, timeout=0.2).acquire()
            except LockTimeout:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- record locks for shared storage (shared_storage=True) -------------------


def test_record_lock_excludes_other_processes_and_other_objects(tmp_path):
    """An fcntl (OFD) lock: a second Lock object on the file waits, in this
    process as in another one, and a holder's death releases it."""
    d = tmp_path / "share"
    a = lock.Lock("tree", d, shared_storage=True, timeout=0.2)
    with a:
        # another thread of this process (the same thread would nest)
        errors: list[BaseException] = []

        def other() -> None:
            try:
                lock.Lock("tree", d, shared_storage=True, timeout=0.1).acquire()
            except BaseException as e:  # noqa: BLE001 - the finding
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and isinstance(errors[0], LockTimeout), errors
        # and another process: a plain POSIX record lock test, as a process
        # of another host would see it through NFS
        probe = subprocess.run(
            [sys.executable, "-c", _FCNTL_PROBE, str(d / "tree.lock")],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert probe.stdout.strip() == "locked", probe.stderr
    probe = subprocess.run(
        [sys.executable, "-c", _FCNTL_PROBE, str(d / "tree.lock")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert probe.stdout.strip() == "free", probe.stderr


_FCNTL_PROBE = """
import fcntl, sys
fd = open(sys.argv[1], "r+")
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("locked")
else:
    print("free")
"""


def test_record_lock_shared_and_nesting(tmp_path):
    d = tmp_path / "share"
    r1 = lock.Lock("v", d, shared=True, shared_storage=True, timeout=0.1)
    r2 = lock.Lock("v", d, shared=True, shared_storage=True, timeout=0.1)
    with r1, r2:  # two readers
        out: list[str] = []

        def writer() -> None:
            try:
                lock.Lock("v", d, shared_storage=True, timeout=0.1).acquire()
                out.append("taken")
            except LockTimeout:
                out.append("timeout")

        t = threading.Thread(target=writer)
        t.start()
        t.join()
        assert out == ["timeout"]
    w = lock.Lock("v", d, shared_storage=True, timeout=0.1)
    with w:
        # nested in this thread: re-entrant, as flock locks are
        with lock.Lock("v", d, shared_storage=True, timeout=0.1):
            pass
        assert w.held
    with lock.Lock("v", d, shared_storage=True, timeout=0.1):
        pass
