"""Helpers of the plugin black-box tests: run the real plugin executables.

The suites of this directory run over every SR type of ``sr_types.py``
(``plugins/ext/EXTSR``, ``plugins/nfs/NFSSR`` ...).  Every call is a new
process of the real executable (``sys.executable plugins/<type>/<TYPE>SR``)
with ``SM_ROOT`` pointing at the test's tmp root (plus what the type's
backend needs, e.g. the NFS server's development-mount map); the request is
built by ``xmlrpc.client.dumps`` and the response parsed by
``xmlrpc.client.loads``.  Nothing here imports the engine: the only library
these tests use is ``smcommon.vhd`` to read and write the images named by
``attach_info.params``, as a VM backend would.

The fixtures over these helpers are in conftest.py beside this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import uuid
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[3]
PLUGIN = REPO / "plugins" / "ext" / "EXTSR"
CALL_TIMEOUT = float(os.environ.get("EXT_CALL_TIMEOUT", "90"))
MiB = 1024 * 1024
BLOCK = 2 * MiB


@dataclass
class Reply:
    rc: int
    stdout: str
    stderr: str
    status: str = ""
    value: Any = None
    error: list[str] = field(default_factory=list)
    fault: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "Success"

    def describe(self) -> str:
        return (
            f"rc={self.rc} status={self.status!r} value={self.value!r} "
            f"error={self.error!r} fault={self.fault!r}\n"
            f"stdout={self.stdout[:2000]!r}\nstderr={self.stderr[-3000:]!r}"
        )


def parse_response(rc: int, out: str, err: str) -> Reply:
    """Parse one methodResponse; assert the wire invariants every reply keeps."""
    reply = Reply(rc, out, err)
    assert rc == 0, f"EXTSR exited {rc}\n{reply.describe()}"
    assert "Traceback" not in out, f"traceback on stdout\n{reply.describe()}"
    try:
        (body,), _ = xmlrpc.client.loads(out)
    except xmlrpc.client.Fault as f:
        reply.fault = f"{f.faultCode}: {f.faultString}"
        return reply
    except Exception as e:  # noqa: BLE001 - any parse error is the finding
        raise AssertionError(f"not a methodResponse: {e}\n{reply.describe()}") from None
    assert isinstance(body, dict), f"response is not a struct\n{reply.describe()}"
    reply.status = body.get("Status", "")
    assert reply.status in ("Success", "Failure"), reply.describe()
    if reply.ok:
        assert "Value" in body, reply.describe()
        reply.value = body["Value"]
    else:
        desc = body.get("ErrorDescription")
        assert isinstance(desc, list) and desc, reply.describe()
        assert all(isinstance(x, str) for x in desc), reply.describe()
        reply.error = desc
    return reply


class Ext:
    """A real plugin executable (EXTSR unless told) on one SM_ROOT."""

    def __init__(
        self,
        root: Path,
        dbg: str = "itest",
        plugin: Path = PLUGIN,
        env: dict[str, str] | None = None,
        sr_type: str = "ext",
        backend: Any = None,
    ) -> None:
        self.root = root
        self.dbg = dbg
        self.plugin = plugin
        self.env = {**os.environ, **(env or {}), "SM_ROOT": str(root)}
        self.sr_type = sr_type
        self.backend = backend  # the type's server (NfsServer for nfs), if any
        self.calls = 0

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, str(self.plugin), *extra]

    def run_raw(
        self, data: bytes | str | None, *extra: str, timeout: float = CALL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        return subprocess.run(
            self.argv(*extra),
            input=data.decode() if isinstance(data, bytes) else (data or ""),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def raw(self, data: bytes | str, *extra: str) -> Reply:
        p = self.run_raw(data, *extra)
        return parse_response(p.returncode, p.stdout, p.stderr)

    @staticmethod
    def request(method: str, args: dict[str, Any]) -> str:
        return xmlrpc.client.dumps((args,), methodname=method)

    def call(self, method: str, **args: Any) -> Reply:
        args.setdefault("dbg", self.dbg)
        return self.raw(self.request(method, args))

    def ok(self, method: str, **args: Any) -> Any:
        r = self.call(method, **args)
        assert r.ok, f"{method} {args!r} failed\n{r.describe()}"
        return r.value

    def err(self, method: str, **args: Any) -> list[str]:
        r = self.call(method, **args)
        assert not r.ok, f"{method} {args!r} should have failed\n{r.describe()}"
        assert r.error, (
            f"{method}: a fault instead of an ErrorDescription\n{r.describe()}"
        )
        return r.error

    def popen(self, method: str, **args: Any) -> subprocess.Popen[bytes]:
        """Start a call and return the running process (crash tests)."""
        args.setdefault("dbg", self.dbg)
        p = subprocess.Popen(
            self.argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        assert p.stdin is not None
        p.stdin.write(self.request(method, args).encode())
        p.stdin.close()
        return p


def vinfo(name: str, size: int | str = 8 * MiB, **extra: Any) -> dict[str, Any]:
    """A vdi_info input; int64 sizes go as decimal strings (XML-RPC ints are 32-bit)."""
    d: dict[str, Any] = {"name_label": name, "virtual_size": str(size)}
    d.update(extra)
    return d


def is_vhd(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(8) == b"conectix":
                return True
            f.seek(0, os.SEEK_END)
            if f.tell() < 512:
                return False
            f.seek(-512, os.SEEK_END)
            return f.read(8) == b"conectix"
    except OSError:
        return False


class SR:
    """An attached SR and the data checks of the tests.

    ``data_dir`` is where the plugin keeps the SR (the mount point for the
    kinds that mount); ``backing`` is where its files live seen from outside
    the plugin (the ``path`` directory, or the NFS server's exported
    directory of the SR), None if nowhere (ext4 on a loop device)."""

    def __init__(
        self,
        ext: Ext,
        uuid_: str,
        kind: str,
        data_dir: Path,
        config: dict[str, str],
        backing: Path | None = None,
    ) -> None:
        self.ext = ext
        self.config = config
        self.uuid = uuid_
        self.kind = kind
        self.data_dir = data_dir
        self.backing = backing

    @property
    def mounted(self) -> bool:
        """Whether this kind of SR is a mount on the host (ext4, nfs)."""
        return self.kind != "path"

    # --- calls ----------------------------------------------------------
    def ok(self, method: str, **args: Any) -> Any:
        return self.ext.ok(method, sr=self.uuid, **args)

    def err(self, method: str, **args: Any) -> list[str]:
        return self.ext.err(method, sr=self.uuid, **args)

    def diagnostics(self) -> str:
        """This SR's part of Query.diagnostics."""
        text = self.ext.ok("Query.diagnostics")
        assert isinstance(text, str)
        head = f"SR {self.uuid} ("
        start = text.find(head)
        assert start >= 0, f"SR {self.uuid} not in the diagnostics:\n{text}"
        end = text.find("\nSR ", start + len(head))
        return text[start : end if end >= 0 else len(text)]

    def wait_gc(self, timeout: float = 180.0) -> str:
        """Wait until the SR's collector process has collected every request
        (VDI.destroy, compose and set_persistent return before it does)."""
        deadline = time.monotonic() + timeout
        while True:
            diag = self.diagnostics()
            if "gc collector: idle" in diag:
                return diag
            assert time.monotonic() < deadline, f"collector still busy:\n{diag}"
            time.sleep(0.1)

    def create(
        self, name: str, size: int | str = 8 * MiB, **extra: Any
    ) -> dict[str, Any]:
        return self.ok("VDI.create", vdi_info=vinfo(name, size, **extra))

    def scan(self) -> dict[str, dict[str, Any]]:
        vdis = self.ok("SR.scan")
        keys = [v["vdi"] for v in vdis]
        assert len(keys) == len(set(keys)), f"SR.scan lists a VDI twice: {keys}"
        return {v["vdi"]: v for v in vdis}

    def snapshot(self, vdi: str, **extra: Any) -> dict[str, Any]:
        return self.ok("VDI.snapshot", vdi_info={"vdi": vdi, **extra})

    def clone(self, vdi: str, **extra: Any) -> dict[str, Any]:
        return self.ok("VDI.clone", vdi_info={"vdi": vdi, **extra})

    def attach(self, vdi: str, dp: str, rw: bool) -> str:
        info = self.ok("VDI.attach", dp=dp, vdi=vdi, read_write=rw)
        assert isinstance(info, dict) and isinstance(info.get("params"), str), info
        assert isinstance(info.get("xenstore_data", {}), dict), info
        return info["params"]

    @contextlib.contextmanager
    def opened(
        self, vdi: str, rw: bool = False, dp: str | None = None
    ) -> Iterator[str]:
        """attach + activate, yield the image path, deactivate + detach."""
        dp = dp or f"t-{'rw' if rw else 'ro'}-{uuid.uuid4().hex[:8]}"
        path = self.attach(vdi, dp, rw)
        self.ok("VDI.activate", dp=dp, vdi=vdi)
        try:
            yield path
        finally:
            self.ok("VDI.deactivate", dp=dp, vdi=vdi)
            self.ok("VDI.detach", dp=dp, vdi=vdi)

    def write(self, vdi: str, writes: dict[int, bytes]) -> None:
        from smcommon import vhd

        with self.opened(vdi, rw=True) as path:
            for off, data in writes.items():
                vhd.write(path, off, data)

    def leaf_path(self, vdi: str) -> str:
        url = self.ok("VDI.get_url", vdi=vdi)
        return os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))

    def read(self, vdi: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Read through VDI.get_url (one call; the URL is a file:// image)."""
        from smcommon import vhd

        url = self.ok("VDI.get_url", vdi=vdi)
        parsed = urllib.parse.urlparse(url)
        assert parsed.scheme == "file", url
        path = urllib.parse.unquote(parsed.path)
        return [vhd.read(path, off, n) for off, n in ranges]

    def read_attached(self, vdi: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Read as a VM would: attach + activate, read the params image, release."""
        from smcommon import vhd

        with self.opened(vdi) as path:
            return [vhd.read(path, off, n) for off, n in ranges]

    # --- on-disk checks -------------------------------------------------
    def holds_image(self, path: str) -> bool:
        """``path`` (an attach_info params) names an image of this SR."""
        return Path(path).resolve().is_relative_to(self.data_dir.resolve())

    def vhd_files(self) -> dict[Path, Any]:
        from smcommon import vhd

        out = {}
        for p in sorted(self.data_dir.rglob("*")):
            if p.is_file() and not p.is_symlink() and is_vhd(p):
                out[p] = vhd.info(str(p))
        return out

    def assert_consistent(self, *, after_gc: bool = False) -> dict[str, dict[str, Any]]:
        """SR.scan, VDI.stat of each VDI, vhd.check of every image; the tree
        has one visible leaf per VDI, no hidden image without children, and
        after a GC no hidden image with a single child."""
        from smcommon import vhd

        scan = self.scan()
        # VDI.stat of (a sample of) the VDIs: each is a process start
        for key, info in list(scan.items())[:8]:
            st = self.ok("VDI.stat", vdi=key)
            assert st["vdi"] == key
            assert int(st["virtual_size"]) == int(info["virtual_size"])
        files = self.vhd_files()
        problems = {str(p): vhd.check(str(p)) for p in files}
        assert all(not v for v in problems.values()), f"vhd.check: {problems}"
        kids: dict[str, list[str]] = {}
        for p, inf in files.items():
            if inf.parent:
                assert os.path.exists(inf.parent), f"{p}: parent {inf.parent} missing"
                kids.setdefault(os.path.realpath(inf.parent), []).append(
                    os.path.realpath(p)
                )
        visible = [p for p, inf in files.items() if not inf.hidden]
        hidden = [p for p, inf in files.items() if inf.hidden]
        assert len(visible) == len(scan), (
            f"{len(visible)} visible images for {len(scan)} VDIs in SR.scan: "
            f"{sorted(map(str, visible))}"
        )
        # a non-persistent VDI's frozen content (its epoch base) is kept even
        # with a single child: the leaf of that VDI
        if after_gc:
            # nothing but images (and the SR's own hidden metadata directory):
            # no temp file of a killed call survives a collection
            stray = [
                p
                for p in self.data_dir.iterdir()
                if not p.name.startswith(".") and p.is_file() and p not in files
            ]
            assert not stray, f"orphan files after SR.gc: {stray}"
        np_leaves = {self.leaf_path(k) for k, v in scan.items() if not v["persistent"]}
        for p in hidden:
            n = kids.get(os.path.realpath(p), [])
            assert n, f"hidden image {p} has no child (garbage)"
            if after_gc and len(n) == 1:
                assert n[0] in np_leaves, (
                    f"hidden image {p} has a single child after SR.gc"
                )
        return scan


def _mounts_under(root: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(str(root)):
                out.append(mnt)
    return out


class SrFactory:
    """Creates and attaches SRs of the plugin's type; tears down mounts and
    loop devices.  ``make()`` makes the type's default kind (sr_types.py)."""

    def __init__(self, ext: Ext, tmp: Path) -> None:
        from sr_types import SR_TYPES

        self.ext = ext
        self.tmp = tmp
        self.spec = SR_TYPES[ext.sr_type]
        self.loops: list[str] = []
        self.srs: list[SR] = []
        self.targets: list[Any] = []  # LUNs made on the iSCSI backend

    def loop_device(self, size: str = "256M") -> str:
        if os.geteuid() != 0:
            pytest.skip("ext4 on a loop device needs root")
        if not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
            pytest.skip("losetup or mkfs.ext4 missing (util-linux, e2fsprogs)")
        img = self.tmp / f"disk-{len(self.loops)}.img"
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        # who owns the device: a later session detaches it if this one died
        # without its teardown (killed pytest)
        Path(str(img) + OWNER_SUFFIX).write_text(str(os.getpid()))
        p = subprocess.run(
            ["losetup", "--find", "--show", str(img)],
            capture_output=True,
            text=True,
            check=False,
        )
        if p.returncode != 0:
            pytest.skip(f"losetup failed: {p.stderr.strip()}")
        dev = p.stdout.strip()
        self.loops.append(dev)
        return dev

    def make(self, kind: str | None = None, *, attach: bool = True) -> SR:
        kind = kind or self.spec.kinds[0]
        if kind not in self.spec.kinds:
            raise ValueError(
                f"{self.spec.name} SRs come in {self.spec.kinds}, not {kind}"
            )
        sr_uuid = str(uuid.uuid4())
        mount_point = self.ext.root / "run" / "sm" / "sr-mount" / sr_uuid
        backing: Path | None = None
        if kind == "path":
            d = self.tmp / f"sr-{sr_uuid[:8]}"
            d.mkdir()
            config = {"path": str(d)}
            data_dir = backing = d
        elif kind == "ext4":
            config = {"device": self.loop_device()}
            data_dir = mount_point
        elif kind == "iscsi":
            return self._make_lvmoiscsi(sr_uuid, attach)
        elif kind.startswith("nfs"):
            server = self.ext.backend
            config = {"server": server.address, "serverpath": "/export",
                      "nfsversion": kind[3:]}  # fmt: skip
            data_dir = mount_point
            backing = server.export_dir / sr_uuid
        else:
            raise ValueError(f"no SR kind {kind}")
        self.ext.ok("SR.create", sr=sr_uuid, device_config=config, physical_size="0")
        sr = SR(self.ext, sr_uuid, kind, data_dir, config, backing)
        self.srs.append(sr)
        if attach:
            self.ext.ok("SR.attach", sr=sr_uuid, device_config=config)
        return sr

    def _make_lvmoiscsi(self, sr_uuid: str, attach: bool) -> SR:
        """An lvmoiscsi SR on a new LUN of the session's tgtd (lvmo_helpers)."""
        from lvmo_helpers import LvmoSR, device_config

        tgtd = self.ext.backend
        target = tgtd.add_target("suite")
        self.targets.append(target)
        config = device_config(tgtd, target)
        self.ext.ok("SR.create", sr=sr_uuid, device_config=config, physical_size="0")
        sr = LvmoSR(self.ext, sr_uuid, config, target)
        self.srs.append(sr)
        if attach:
            self.ext.ok("SR.attach", sr=sr_uuid, device_config=config)
        return sr

    def cleanup(self) -> None:
        for sr in self.srs:
            with contextlib.suppress(Exception):
                r = self.ext.call("SR.detach", sr=sr.uuid)
                if not r.ok and self.targets:
                    self.ext.call("SR.reset", sr=sr.uuid)
        if self.targets:
            from lvmo_helpers import force_cleanup

            force_cleanup(self.ext.root)
            for t in self.targets:
                self.ext.backend.remove_target(t)
        for mnt in reversed(_mounts_under(self.ext.root)):
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


OWNER_SUFFIX = ".owner-pid"


def sweep_stale_loop_devices() -> list[str]:
    """Unmount and detach loop devices this suite attached in a session that
    died without its teardown (its owner pid is gone).  Devices of live
    sessions (other people running the suite at the same time) are left alone."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        return []
    p = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    )
    swept = []
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) != 2:
            continue
        dev, back = parts[0], parts[1].strip().removesuffix(" (deleted)")
        if "/pytest-of-" not in back or not Path(back).name.startswith("disk-"):
            continue
        owner = Path(back + OWNER_SUFFIX)
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and psutil.pid_exists(pid):
            continue
        with open("/proc/self/mounts") as f:
            mounts = [ln.split()[1] for ln in f if ln.split()[0] == dev]
        for mnt in mounts:
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        swept.append(dev)
    return swept


def leftover_processes(root: Path, wait: float = 60.0) -> list[psutil.Process]:
    """Processes still running with our SM_ROOT (plugin calls, helpers).

    An SR's collector process outlives the call that started it, and stops
    once it has collected: it is waited for (at most ``wait`` seconds) before
    it counts as left running.  An exited process not yet reaped by init (a
    zombie) is not running."""
    deadline = time.monotonic() + wait
    while True:
        out = []
        for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
            with contextlib.suppress(psutil.Error):
                env = proc.info.get("environ") or {}
                if proc.info.get("status") == psutil.STATUS_ZOMBIE:
                    continue
                if env.get("SM_ROOT") == str(root) and proc.pid != os.getpid():
                    out.append(proc)
        collecting = [
            p
            for p in out
            if "smcommon.engine.collector" in (p.info.get("cmdline") or [])
        ]
        if not collecting or time.monotonic() > deadline:
            return [p for p in out if _alive(p)]  # not one that exited meanwhile
        time.sleep(0.05)


def collector_processes(root: Path) -> list[psutil.Process]:
    """The SR collector processes running with our SM_ROOT."""
    out = []
    for p in psutil.process_iter(["cmdline", "environ", "status"]):
        try:
            env = p.info.get("environ") or {}
            cmd = p.info.get("cmdline") or []
        except psutil.Error:
            continue
        if (
            env.get("SM_ROOT") == str(root)
            and "smcommon.engine.collector" in cmd
            and p.info.get("status") != psutil.STATUS_ZOMBIE
        ):
            out.append(p)
    return out


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
