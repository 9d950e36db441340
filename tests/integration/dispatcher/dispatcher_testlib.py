"""Helpers of the dispatcher's integration tests (fixtures: conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from dispatcher import client

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
FAKE = HERE / "fake_plugin.py"
ZYGOTE_MARK = "dispatcher/zygote.py"
SETTLE = 2.0  # seconds the daemon may take to see a call's process gone
MODES = ("warm", "exec")  # how the daemon makes plugin processes (sm-dispatcher --no-warm)
MAKE_CERTS = REPO / "scripts" / "make-certs"


def make_certs(d: Path, *names: str, expired: bool = False) -> Path:
    """``scripts/make-certs d NAMES``: a CA in ``d`` (the first time) and a
    certificate per name; ``d``."""
    argv = [sys.executable, str(MAKE_CERTS), *(["--expired"] if expired else []), str(d), *names]
    subprocess.run(argv, check=True, capture_output=True)
    return d


def write_pool(
    root: Path,
    certs: Path,
    name: str,
    allow: Sequence[str],
    peers: Sequence[tuple[str, str]] = (),
) -> Path:
    """``<root>/etc/sm/pool.json``: host ``name``'s identity from ``certs``,
    the clients it lets in, and its peers as (name, url)."""
    doc = {
        "cert": str(certs / f"{name}.pem"),
        "key": str(certs / f"{name}.key"),
        "ca": str(certs / "ca.pem"),
        "allow": list(allow),
        "peers": [{"name": n, "url": u, "cert_name": n} for n, u in peers],
    }
    path = root / "etc" / "sm" / "pool.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def tls_client(certs: Path, name: str) -> ssl.SSLContext:
    """A client context presenting ``name``'s certificate, trusting ``certs``' CA."""
    return client.tls_context(
        str(certs / f"{name}.pem"), str(certs / f"{name}.key"), str(certs / "ca.pem")
    )


def install_fake(plugins: Path, name: str) -> Path:
    exe = plugins / name
    exe.write_text(f"#!{sys.executable} -S\n" + FAKE.read_text())
    exe.chmod(0o755)
    return exe


def fake_pids(fake_logs: Path) -> list[int]:
    try:
        return [int(x) for x in (fake_logs / "pids").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int, grace: float = 5.0) -> bool:
    """Whether ``pid`` still runs ``grace`` seconds from now at the latest
    (a SIGKILL is delivered asynchronously: give it time to land)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.01)


def processes_with_root(
    root: Path, collectors_wait: float = 60.0
) -> list[psutil.Process]:
    """Every live process whose environment has SM_ROOT=root (except us).

    An SR's collector process (``smcommon.engine.collector``) outlives the
    call that started it and stops once it has collected: it is waited for,
    at most ``collectors_wait`` seconds, before it counts."""
    deadline = time.monotonic() + collectors_wait
    while True:
        found = []
        for p in psutil.process_iter(["pid"]):
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if (
                    p.environ().get("SM_ROOT") == str(root)
                    and p.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(p)
        collecting = []
        for p in found:
            with contextlib.suppress(psutil.Error):
                if "smcommon.engine.collector" in p.cmdline():
                    collecting.append(p)
        if not collecting or time.monotonic() > deadline:
            return [p for p in found if _alive(p)]  # not one that exited meanwhile
        time.sleep(0.05)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], banner: str, root: Path) -> None:
        self.proc = proc
        self.banner = banner
        self.root = root
        m = re.search(r"unix socket: (\S+)", banner)
        self.socket = Path(m.group(1)) if m else None
        m = re.search(r"tcp: (https?://\S+)", banner)
        self.url = m.group(1) if m else None
        m = re.search(r"default SR: (\S+)", banner)
        self.default_sr = m.group(1) if m else None

    def unix(self, path: str = "/", timeout: float = 60) -> xmlrpc.client.ServerProxy:
        assert self.socket is not None
        return client.connect(self.socket, path=path, timeout=timeout)

    def tcp(
        self, path: str = "/", tls: ssl.SSLContext | None = None, name: str | None = None
    ) -> xmlrpc.client.ServerProxy:
        """A proxy over TCP: plain HTTP (``--insecure``), or TLS with ``tls``
        expecting the server certificate ``name``."""
        assert self.url is not None
        if self.url.startswith("https://"):
            assert tls is not None, "a TLS dispatcher needs a client context"
            return client.connect(self.url, path=path, context=tls, server_name=name, timeout=120)
        return xmlrpc.client.ServerProxy(self.url.rstrip("/") + path, allow_none=True)

    def client(self) -> client.Client:
        return client.Client(self.socket)

    def status(self) -> dict[str, Any]:
        r = self.unix("/").Dispatcher.status({"dbg": "testlib"})
        assert r["Status"] == "Success", r
        return dict(r["Value"])

    def warm_parents(self) -> list[int]:
        """The pids of the daemon's warm parents (zygotes) that still run."""
        return [w["pid"] for w in self.status()["warm"] if w["state"] in ("ready", "draining")]

    def wait_warm(self, count: int, timeout: float = 60) -> list[int]:
        """Wait until ``count`` warm parents are ready; their pids."""
        def ready() -> list[int]:
            ws = [w["pid"] for w in self.status()["warm"] if w["state"] == "ready"]
            return ws if len(ws) >= count else []

        found = wait_until(ready, timeout, f"{count} warm parent(s) ready")
        assert isinstance(found, list)
        return found

    def spares(self) -> list[int]:
        """The pids of the children the warm parents forked ahead for the next call."""
        return [w["spare"] for w in self.status()["warm"] if w["spare"]]

    def _descendants(self) -> list[psutil.Process]:
        """Every process below the daemon but its warm parents and their
        spare children (which are expected to live as long as it does)."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        spares = set(self.spares()) if self.proc.poll() is None else set()
        out = []
        for c in procs:
            with contextlib.suppress(psutil.Error):
                zygote = c.ppid() == self.proc.pid and ZYGOTE_MARK in " ".join(c.cmdline())
                if not zygote and c.pid not in spares:
                    out.append(c)
        return out

    def children(self, settle: float = SETTLE) -> list[psutil.Process]:
        """Plugin processes (and what they started) still running, once
        ``settle`` seconds passed or none is left: a forked call's process
        answers before its exit ends (dispatcher/zygote.py, EXIT_MARK)."""
        return self._left(lambda c: c.status() != psutil.STATUS_ZOMBIE, settle)

    def zombies(self, settle: float = SETTLE) -> list[psutil.Process]:
        """Exited plugin processes not reaped yet (the warm parent reaps
        those the dispatcher is done with within REAP_POLL of their end)."""
        return self._left(lambda c: c.status() == psutil.STATUS_ZOMBIE, settle)

    def _left(self, which: Callable[[psutil.Process], bool], settle: float) -> list[psutil.Process]:
        deadline = time.monotonic() + settle
        while True:
            out = []
            for c in self._descendants():
                with contextlib.suppress(psutil.Error):
                    if which(c):
                        out.append(c)
            if not out or time.monotonic() >= deadline:
                return out
            time.sleep(0.02)

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
            raise AssertionError(
                f"the daemon did not stop on SIGTERM within {timeout}s"
            ) from None
        return self.proc.returncode, err


def spawn_daemon(args: list[str], root: Path) -> Daemon:
    """``python -m dispatcher ARGS`` with SM_ROOT=root, returned once its
    start-up banner has been read (whatever it says: callers check it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", SM_ROOT=str(root)),
        cwd=REPO,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("  python:"):
            break
    return Daemon(proc, "".join(lines), root)


def wait_until(
    pred: Callable[[], object], timeout: float = 20, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
