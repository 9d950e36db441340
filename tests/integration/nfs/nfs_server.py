"""A real NFS server for the tests: nfs-ganesha in a network namespace.

``NfsServer(base_dir).start()`` makes a network namespace with a veth pair
(host side ``10.251.K.1/24``, the server ``10.251.K.2``; ``10.251.K.3`` is an
address nobody has: a dead host), and runs rpcbind and nfs-ganesha (FSAL VFS)
in it (``nfs_server_launch.py``), exporting:

- ``/export``  -> ``<base_dir>/export``, read-write for the subnet;
- ``/denied``  -> ``<base_dir>/denied``, exported to everyone but this host
  (``10.251.K.1``: Access_Type None), so its mounts are refused.

ganesha caches neither directory chunks nor attributes here (``Dir_Chunk =
0``, ``Attr_Expiration_Time = 0``): in the development mount the plugin writes
the exported directory directly, and the checks over NFS (nfs-ls, nfs-cat)
must see those writes at once.

``stop_nfs()`` / ``start_nfs()`` stop and restart ganesha (rpcbind stays),
``pause()`` / ``resume()`` freeze it (a server that stops answering);
``close()`` stops everything and removes the namespace.  Namespaces of
sessions killed before their teardown are removed by ``sweep_stale()``.
Needs root, ``ip``, ``ganesha.nfsd``, ``rpcbind`` (scripts/setup).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "nfs_server_launch.py"
PREFIX = "smnfs-"
TOOLS = ("ip", "ganesha.nfsd", "rpcbind", "rpcinfo", "showmount", "nfs-ls", "nfs-cat")

GANESHA_CONF = """\
NFS_CORE_PARAM {{
    Bind_addr = {addr};
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Protocols = 3, 4;
    Mount_Path_Pseudo = true;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {base}/recovery; }}
MDCACHE {{ Dir_Chunk = 0; }}
EXPORT {{
    Export_Id = 1;
    Path = {base}/export;
    Pseudo = /export;
    Access_Type = RW;
    Attr_Expiration_Time = 0;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3, 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
    CLIENT {{ Clients = {subnet}; Access_Type = RW; }}
}}
EXPORT {{
    Export_Id = 2;
    Path = {base}/denied;
    Pseudo = /denied;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = krb5;
    Protocols = 3, 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
    CLIENT {{ Clients = {subnet}; Access_Type = RW; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def skip_without_nfs_server() -> None:
    """pytest.skip unless this machine can run the server (root, the tools)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("the NFS server fixture needs root (network namespace, mounts)")
    missing = missing_tools()
    if missing:
        pytest.skip(f"NFS tools missing (scripts/setup installs them): {missing}")


def dev_env(server: NfsServer, where: Path) -> dict[str, str]:
    """SM_NFS_DEV_* for plugin calls against ``server`` (the map written in
    ``where``).  On a kernel with an NFS client the plugin mounts for real and
    does not use the development mode; this kernel has none."""
    return {
        "SM_NFS_DEV_MODE": "1",
        "SM_NFS_DEV_EXPORTS": str(server.write_dev_map(where / "nfs-dev-exports.json")),
    }


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(name: str) -> None:
    """SIGKILL whatever still runs in network namespace ``name`` (only this
    module's servers run there), then remove the namespace."""
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    _ip("netns", "delete", name, check=False)


def sweep_stale() -> list[str]:
    """Remove namespaces (and their veths) of test sessions that died."""
    gone = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        _kill_namespace(name)
        gone.append(name)
    return gone


def _free_subnet() -> int:
    used = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
    start = os.getpid() % 200
    for i in range(200):
        k = 20 + (start + i) % 200
        if f"10.251.{k}." not in used:
            return k
    raise RuntimeError("no free 10.251.K.0/24 subnet for the NFS server")


class NfsServer:
    """One ganesha in its own network namespace; see the module doc."""

    _count = 0
    started: ClassVar[list[str]] = []  # addresses of the servers this session started

    def __init__(self, base_dir: Path) -> None:
        NfsServer._count += 1
        n = NfsServer._count
        self.base = Path(base_dir)
        self.name = f"{PREFIX}{os.getpid()}-{n}"
        tag = f"{os.getpid() % 100000:05d}{n % 100:02d}"
        self.host_if, self.ns_if = f"vnh{tag}", f"vnn{tag}"
        self.k = 0
        self.proc: subprocess.Popen[str] | None = None
        self.ganesha_pid = 0

    # --- addresses ---------------------------------------------------------
    @property
    def address(self) -> str:
        return f"10.251.{self.k}.2"

    @property
    def host_address(self) -> str:
        return f"10.251.{self.k}.1"

    @property
    def dead_address(self) -> str:
        """An address of the subnet that no host has (ARP goes unanswered)."""
        return f"10.251.{self.k}.3"

    @property
    def export_dir(self) -> Path:
        return self.base / "export"

    def dev_map(self) -> dict[str, str]:
        """For SM_NFS_DEV_EXPORTS: the server's exports as local directories."""
        return {
            f"{self.address}:/export": str(self.export_dir),
            f"{self.address}:/denied": str(self.base / "denied"),
        }

    def write_dev_map(self, path: Path) -> Path:
        path.write_text(json.dumps(self.dev_map()))
        return path

    # --- life --------------------------------------------------------------
    def start(self) -> NfsServer:
        for d in ("export", "denied", "recovery", "run"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.k = _free_subnet()
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            ns = ("netns", "exec", self.name, "ip")
            _ip(*ns, "addr", "add", f"{self.address}/24", "dev", self.ns_if)
            _ip(*ns, "link", "set", self.ns_if, "up")
            _ip(*ns, "link", "set", "lo", "up")
            conf = self.base / "ganesha.conf"
            text = GANESHA_CONF.format(
                addr=self.address, host=self.host_address, base=self.base,
                subnet=f"10.251.{self.k}.0/24",
            )  # fmt: skip
            conf.write_text(text)
            with open(self.base / "launcher.err", "w") as err:
                self.proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.name, sys.executable, str(LAUNCHER),
                     str(conf), str(self.base / "ganesha.log"), str(self.base / "run"),
                     self.address],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                    # not a host's process: no SM_ROOT a test's leftover check could see
                    env={k: v for k, v in os.environ.items() if k != "SM_ROOT"},
                )  # fmt: skip
            line = self._read_line(30)
            if not line.startswith("ready"):
                raise RuntimeError(f"NFS server did not start: {line!r}; {self.logs()}")
            self.ganesha_pid = int(line.split()[1])
            NfsServer.started.append(self.address)
        except BaseException:
            self.close()
            raise
        return self

    def _read_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"NFS server launcher silent for {timeout}s; {self.logs()}")
        return self.proc.stdout.readline().strip()

    def command(self, cmd: str, timeout: float = 30) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self._read_line(timeout)
        if not line.startswith(f"ok {cmd}"):
            raise RuntimeError(f"{cmd}: {line!r}; {self.logs()}")
        self.ganesha_pid = int(line.split()[2])
        return line

    def stop_nfs(self) -> None:
        self.command("stop")

    def start_nfs(self) -> None:
        self.command("start")

    def pause(self) -> None:
        self.command("pause")

    def resume(self) -> None:
        self.command("resume")

    def logs(self) -> str:
        out = []
        for name in ("launcher.err", "ganesha.log", "run/rpcbind.err"):
            with contextlib.suppress(OSError):
                out.append(f"{name}: {(self.base / name).read_text()[-1500:]}")
        return "\n".join(out)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        _ip("link", "delete", self.host_if, check=False)
        _kill_namespace(self.name)
        deadline = time.monotonic() + 5
        while self.ganesha_pid and _pid_alive(self.ganesha_pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    # --- the client side, for checks ----------------------------------------
    def url(self, path: str, version: str = "3") -> str:
        suffix = "?version=4" if version.startswith("4") else ""
        return f"nfs://{self.address}{path}{suffix}"

    def nfs_ls(self, path: str, version: str = "3") -> dict[str, int]:
        """name -> size of the entries of ``path``, listed over NFS (nfs-ls)."""
        p = subprocess.run(
            ["nfs-ls", self.url(path, version)], capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        if p.returncode != 0:
            raise FileNotFoundError(f"nfs-ls {path}: {p.stderr.strip()}")
        out = {}
        for line in p.stdout.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6:
                out[parts[5]] = int(parts[4])
        return out

    def nfs_cat(self, path: str, version: str = "3") -> bytes:
        p = subprocess.run(
            ["nfs-cat", self.url(path, version)], capture_output=True, timeout=60, check=False
        )
        if p.returncode != 0:
            raise FileNotFoundError(f"nfs-cat {path}: {p.stderr.decode(errors='replace')}")
        return p.stdout
