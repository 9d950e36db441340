"""Boot the kernel tier's guest, run one scenario in it, bring back its steps.

``run_scenario(guest, workdir, scenario, ...)`` boots the cached guest
(build_guest.py) under ``qemu-system-x86_64 -accel tcg`` with:

- the root image read-only underneath (``snapshot=on``: a fresh root per boot);
- the checkout shared read-only over 9p (``smrepo`` -> ``/repo`` in the guest);
- extra virtio disks the test gives (raw files, serial ``smtest-<name>``, so
  udev names them ``/dev/disk/by-id/virtio-smtest-<name>``);
- qemu's user network (the host's loopback is 10.0.2.2 in the guest);
- the console (ttyS0: kernel, init, the agent's output) in ``console.log``;
- the control channel: a virtio serial port connected to a Unix socket the
  harness listens on (the protocol is in guest/agent.py).

Every step the agent reports is timed; a checkpoint calls the test's
callback (the guest waits until it answers) so the host can look at the
storage mid-run. The whole run has a deadline: past it, or when the guest
stops or a step fails, ``GuestFailure`` names the step that was running and
shows the console's tail. qemu is always killed and reaped before returning.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_guest import Guest

QEMU = "qemu-system-x86_64"
MEMORY = "1024"
CPUS = "2"
CONNECT_TIMEOUT = 60.0
EXIT_WAIT = 30.0  # after "done": the guest syncs and powers off
CONSOLE_TAIL = 60  # lines

Checkpoint = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Disk:
    """A raw image file given to the guest as a virtio disk."""

    name: str
    path: Path

    @property
    def guest_path(self) -> str:
        return f"/dev/disk/by-id/virtio-smtest-{self.name}"


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Run:
    """What one boot did: timings and each step's result."""

    scenario: str
    boot_seconds: float = 0.0  # qemu start to the agent's hello
    kernel_uptime: float = 0.0  # the guest's uptime at hello
    total_seconds: float = 0.0  # set when the run ends
    started: float = field(default_factory=time.monotonic)
    kernel: str = ""
    steps: list[Step] = field(default_factory=list)
    checkpoints: dict[str, float] = field(default_factory=dict)

    def result(self, step: str) -> dict[str, Any]:
        for s in self.steps:
            if s.name == step:
                return s.result
        raise KeyError(f"no step {step!r} in {[s.name for s in self.steps]}")

    def timings(self) -> list[str]:
        lines = [
            (
                f"{self.scenario}: boot to agent {self.boot_seconds:.1f} s "
                f"(guest uptime {self.kernel_uptime:.1f} s, kernel {self.kernel}), "
                + (
                    f"whole run {self.total_seconds:.1f} s"
                    if self.total_seconds
                    else f"{time.monotonic() - self.started:.1f} s so far"
                )
            )
        ]
        for s in self.steps:
            lines.append(f"  {s.seconds:7.2f} s  {s.name}")
            parts = s.result.get("timings") or []
            if parts:
                lines.append(f"             ({', '.join(parts)})")
        lines += [
            f"  {t:7.2f} s  host check at {n}" for n, t in self.checkpoints.items()
        ]
        return lines


class GuestFailure(AssertionError):
    """The run failed: which step, why, and the console's tail."""


def run_scenario(
    guest: Guest | None,
    workdir: Path,
    repo: Path,
    scenario: str,
    params: dict[str, Any],
    *,
    boot: tuple[str, ...] = ("udev", "network"),
    disks: tuple[Disk, ...] = (),
    deadline: float = 600.0,
    on_checkpoint: Checkpoint | None = None,
    launcher: Callable[[Path, Path], list[str]] | None = None,
) -> Run:
    """Boot, run ``scenario`` with ``params``, return its Run; GuestFailure
    if any step fails, the guest dies or the deadline passes. ``launcher``
    (console, control socket) -> argv replaces qemu (the harness's tests)."""
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / "console.log"
    sock_path = workdir / "ctl.sock"
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    if launcher is None:
        assert guest is not None, "a guest image, or a launcher"
        argv = qemu_argv(guest, repo, console, sock_path, disks)
    else:
        argv = launcher(console, sock_path)
    (workdir / "qemu.argv").write_text(json.dumps(argv, indent=1))
    started = time.monotonic()
    end = started + deadline
    run = Run(scenario, started=started)
    qemu = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=open(workdir / "qemu.out", "wb"),  # noqa: SIM115 - closed by the child's exit
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    current = "boot: kernel and init"
    try:
        conn = _accept(listener, qemu, min(end, started + CONNECT_TIMEOUT))
        chan = _Lines(conn, qemu)
        while True:
            try:
                msg = chan.recv(end)
            except _Stopped as e:
                raise GuestFailure(
                    _failure(run, current, str(e), console, workdir)
                ) from None
            ev = msg.get("ev")
            if ev == "hello":
                run.boot_seconds = time.monotonic() - started
                run.kernel_uptime = float(msg.get("uptime", 0))
                run.kernel = str(msg.get("kernel", ""))
                plan = {"scenario": scenario, "boot": list(boot), "params": params}
                chan.send({"plan": plan})
                current = "agent: plan received"
            elif ev == "start":
                current = str(msg["step"])
            elif ev == "end":
                step = Step(
                    name=str(msg["step"]),
                    ok=bool(msg["ok"]),
                    seconds=float(msg["seconds"]),
                    result=dict(msg.get("result") or {}),
                    error=str(msg.get("error", "")),
                )
                run.steps.append(step)
                if not step.ok:
                    detail = f"{step.error}\n{msg.get('traceback', '')}"
                    raise GuestFailure(
                        _failure(run, step.name, detail, console, workdir)
                    )
                current = f"after {step.name}"
            elif ev == "checkpoint":
                name = str(msg["name"])
                current = f"host check at {name}"
                t = time.monotonic()
                try:
                    if on_checkpoint is not None:
                        on_checkpoint(name, dict(msg.get("data") or {}))
                except Exception as e:
                    with contextlib.suppress(OSError):
                        chan.send({"ack": name, "ok": False, "error": str(e)[:2000]})
                    raise GuestFailure(
                        _failure(
                            run, current, f"{type(e).__name__}: {e}", console, workdir
                        )
                    ) from e
                finally:
                    run.checkpoints[name] = time.monotonic() - t
                chan.send({"ack": name, "ok": True})
            elif ev == "error":
                raise GuestFailure(
                    _failure(
                        run,
                        current,
                        f"the agent broke:\n{msg.get('traceback')}",
                        console,
                        workdir,
                    )
                )
            elif ev == "done":
                if not msg.get("ok"):
                    raise GuestFailure(
                        _failure(run, current, "the agent gave up", console, workdir)
                    )
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            qemu.wait(timeout=EXIT_WAIT)
        return run
    finally:
        run.total_seconds = time.monotonic() - started
        _stop(qemu)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


def qemu_argv(
    guest: Guest, repo: Path, console: Path, sock: Path, disks: tuple[Disk, ...]
) -> list[str]:
    argv = [
        QEMU,
        "-accel", "tcg",
        "-m", MEMORY,
        "-smp", CPUS,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", "console=ttyS0 panic=-1 quiet net.ifnames=0",
        "-chardev", f"file,id=con,path={console}",
        "-serial", "chardev:con",
        "-drive", f"file={guest.rootfs},format=raw,if=none,id=root,snapshot=on,cache=unsafe",
        "-device", "virtio-blk-pci,drive=root,serial=smtest-root",
        "-virtfs", f"local,path={repo},mount_tag=smrepo,security_model=none,readonly=on",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=ctl,path={sock}",
        "-device", "virtserialport,chardev=ctl,name=smtest.ctl",
        "-nic", "user,model=virtio-net-pci",
    ]  # fmt: skip
    for d in disks:
        argv += [
            "-drive", f"file={d.path},format=raw,if=none,id=d-{d.name},cache=writeback",
            "-device", f"virtio-blk-pci,drive=d-{d.name},serial=smtest-{d.name}",
        ]  # fmt: skip
    return argv


class _Stopped(Exception):
    pass


def _accept(
    listener: socket.socket, qemu: subprocess.Popen[bytes], end: float
) -> socket.socket:
    while True:
        r, _, _ = select.select([listener], [], [], 0.2)
        if r:
            conn, _ = listener.accept()
            return conn
        if qemu.poll() is not None:
            raise GuestFailure(
                f"qemu exited {qemu.returncode} before connecting its control channel"
            )
        if time.monotonic() > end:
            raise GuestFailure("qemu did not connect its control channel")


class _Lines:
    def __init__(self, conn: socket.socket, qemu: subprocess.Popen[bytes]) -> None:
        self.conn = conn
        self.qemu = qemu
        self.buf = b""

    def send(self, obj: dict[str, Any]) -> None:
        self.conn.sendall((json.dumps(obj) + "\n").encode())

    def recv(self, end: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise _Stopped("the deadline passed")
            r, _, _ = select.select([self.conn], [], [], min(left, 0.5))
            if r:
                chunk = self.conn.recv(65536)
                if not chunk:
                    self.qemu.wait(timeout=10)
                    raise _Stopped(
                        f"the guest stopped (qemu exited {self.qemu.returncode})"
                    )
                self.buf += chunk
            elif self.qemu.poll() is not None:
                raise _Stopped(
                    f"the guest stopped (qemu exited {self.qemu.returncode})"
                )
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg


def _stop(qemu: subprocess.Popen[bytes]) -> None:
    if qemu.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(qemu.pid, 9)
    qemu.wait(timeout=30)


def console_tail(console: Path, lines: int = CONSOLE_TAIL) -> str:
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return "(no console output)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _failure(run: Run, step: str, detail: str, console: Path, workdir: Path) -> str:
    done = "\n".join(run.timings()) if run.steps else "(no step finished)"
    qemu_out = ""
    with contextlib.suppress(OSError):
        qemu_out = (workdir / "qemu.out").read_text(errors="replace").strip()[-2000:]
    return (
        f"kernel tier, scenario {run.scenario}: failed in step [{step}]: {detail.strip()}\n"
        f"--- steps so far:\n{done}\n"
        + (f"--- qemu:\n{qemu_out}\n" if qemu_out else "")
        + f"--- console tail ({console}):\n{console_tail(console)}"
    )
