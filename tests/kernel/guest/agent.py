"""The kernel tier's agent: runs in the guest, started by PID 1 (smtest-init).

It talks to the host's harness (tests/kernel/harness.py) over the virtio
serial port named ``smtest.ctl``, one JSON object per line:

  guest -> host  {"ev": "hello", "uptime": s, "kernel": release}
  host -> guest  {"plan": {"scenario": NAME, "boot": [...], "params": {...}}}
  guest -> host  {"ev": "start", "step": NAME}
                 {"ev": "end", "step": NAME, "ok": true, "seconds": s, "result": {...}}
                 {"ev": "end", "step": NAME, "ok": false, "seconds": s,
                  "error": "...", "traceback": "..."}
                 {"ev": "checkpoint", "name": NAME, "data": {...}}
  host -> guest  {"ack": NAME, "ok": true|false, "error": "..."}
  guest -> host  {"ev": "done", "ok": bool}

The guest's own services are started here as named steps (``boot: udev``,
``boot: network``, ``boot: iscsid``), as systemd would on a host; then the
scenario module ``scenario_<NAME>.py`` beside this file runs its steps. The
first failed step ends the run. Everything is echoed on the console, whose
tail the harness shows when something fails.

Only the standard library and the checkout (``/repo/lib``) are used: the
guest has Debian's python3 and nothing from PyPI.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
PORT = "smtest.ctl"
ACK_TIMEOUT = 600.0
GUEST_ADDR = "10.0.2.15/24"  # qemu user networking: the host is 10.0.2.2
GATEWAY = "10.0.2.2"
PYCACHE = "/var/cache/smtest-pycache"


class Channel:
    """The virtio serial port to the host, JSON lines both ways."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    @classmethod
    def open(cls, wait: float = 30.0) -> Channel:
        deadline = time.monotonic() + wait
        while True:
            base = "/sys/class/virtio-ports"
            for dev in sorted(os.listdir(base)) if os.path.isdir(base) else []:
                with open(os.path.join(base, dev, "name")) as f:
                    if f.read().strip() == PORT:
                        return cls(os.open(f"/dev/{dev}", os.O_RDWR))
            if time.monotonic() > deadline:
                raise RuntimeError(f"no virtio serial port named {PORT}")
            time.sleep(0.1)

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message from the host in {timeout:.0f} s")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    time.sleep(0.05)  # host not connected (yet): poll
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg


class StepFailed(Exception):
    pass


_timed: list[str] = []


def record(what: str, seconds: float) -> None:
    """Time one part of the running step (a plugin call, the VHD writes):
    the step's result carries them as ``timings``."""
    _timed.append(f"{what} {seconds:.2f} s")


def _take_timed() -> list[str]:
    out = list(_timed)
    _timed.clear()
    return out


class Steps:
    """Named, timed steps reported to the host; what the scenarios use."""

    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.results: dict[str, Any] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """``with steps.step("ext: SR.create") as result: ...``; what the
        block puts in ``result`` goes to the host with the step's end."""
        result: dict[str, Any] = {}
        _take_timed()
        self.ch.send({"ev": "start", "step": name})
        print(f"smtest: step {name}: start", flush=True)
        t = time.monotonic()
        try:
            yield result
        except Exception as e:
            took = time.monotonic() - t
            result["timings"] = _take_timed()
            tb = traceback.format_exc()
            print(f"smtest: step {name}: FAILED after {took:.2f} s\n{tb}", flush=True)
            _print_kernel_log()
            self.ch.send(
                {
                    "ev": "end",
                    "step": name,
                    "ok": False,
                    "seconds": round(took, 3),
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": tb[-6000:],
                    "result": result,
                }
            )
            raise StepFailed(name) from e
        took = time.monotonic() - t
        result["timings"] = _take_timed()
        print(f"smtest: step {name}: ok {took:.2f} s", flush=True)
        self.ch.send(
            {
                "ev": "end",
                "step": name,
                "ok": True,
                "seconds": round(took, 3),
                "result": result,
            }
        )

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        with self.step(name) as result:
            result.update(fn() or {})
        return result

    def checkpoint(
        self, name: str, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Let the host look at the storage now; returns its answer."""
        print(f"smtest: checkpoint {name}: waiting for the host", flush=True)
        self.ch.send({"ev": "checkpoint", "name": name, "data": data or {}})
        ack = self.ch.recv(ACK_TIMEOUT)
        if ack.get("ack") != name:
            raise RuntimeError(f"checkpoint {name}: unexpected answer {ack}")
        if not ack.get("ok"):
            raise RuntimeError(f"checkpoint {name}: the host found: {ack.get('error')}")
        return ack


def _print_kernel_log(lines: int = 40) -> None:
    """The kernel's last messages on the console (the boot is ``quiet``):
    what the kernel said about a failed step (NFS timeouts, SCSI errors)."""
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["dmesg", "--ctime"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.splitlines()
        print("smtest: kernel log tail:", *out[-lines:], sep="\n", flush=True)


def sh(
    *argv: str, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """A command of the agent itself (services, checks), output to the console
    when it fails."""
    r = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {r.returncode}: {(r.stdout + r.stderr).strip()[-2000:]}"
        )
    return r


# --- the guest's services ------------------------------------------------------


def boot_udev() -> dict[str, Any]:
    """udevd as systemd-udevd.service would run it, then coldplug: module
    autoloading, /dev/disk/by-* links, lvm's udev rules."""
    sh("/lib/systemd/systemd-udevd", "--daemon")
    sh("udevadm", "trigger", "--type=subsystems", "--action=add")
    sh("udevadm", "trigger", "--type=devices", "--action=add")
    sh("udevadm", "settle", "--timeout=120", timeout=150)
    return {
        "disks": sorted(os.listdir("/dev/disk/by-id"))
        if os.path.isdir("/dev/disk/by-id")
        else []
    }


def boot_network() -> dict[str, Any]:
    """Static address on qemu's user network (no DHCP client needed)."""
    deadline = time.monotonic() + 30
    ifaces: list[str] = []
    while not ifaces:
        ifaces = [i for i in sorted(os.listdir("/sys/class/net")) if i != "lo"]
        if not ifaces:
            if time.monotonic() > deadline:
                raise RuntimeError("no network interface (virtio_net not loaded?)")
            time.sleep(0.1)
    dev = ifaces[0]
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "set", dev, "up")
    sh("ip", "addr", "add", GUEST_ADDR, "dev", dev)
    sh("ip", "route", "add", "default", "via", GATEWAY)
    return {"interface": dev, "address": GUEST_ADDR}


def boot_iscsid() -> dict[str, Any]:
    """open-iscsi's daemon, as its service unit starts it."""
    sh("iscsid")
    deadline = time.monotonic() + 30
    while sh("pgrep", "-x", "iscsid", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("iscsid did not start")
        time.sleep(0.1)
    with open("/etc/iscsi/initiatorname.iscsi") as f:
        name = [x for x in f.read().splitlines() if x.startswith("InitiatorName=")]
    return {"initiator": name[0].split("=", 1)[1] if name else ""}


BOOT_STEPS: dict[str, Callable[[], dict[str, Any]]] = {
    "udev": boot_udev,
    "network": boot_network,
    "iscsid": boot_iscsid,
}


def main() -> int:
    # the checkout is read-only: compiled modules go to the guest's disk, so
    # each plugin call does not compile the library again (an installed
    # package has its .pyc too)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = PYCACHE
    sys.dont_write_bytecode = False
    ch = Channel.open()
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    ch.send({"ev": "hello", "uptime": uptime, "kernel": os.uname().release})
    print(f"smtest: agent up at {uptime:.1f} s of uptime", flush=True)
    ok = False
    try:
        plan = ch.recv(ACK_TIMEOUT)["plan"]
        steps = Steps(ch)
        for name in plan.get("boot", []):
            steps.run(f"boot: {name}", BOOT_STEPS[name])
        sys.path[:0] = [HERE, os.path.join(REPO, "lib")]
        scenario = importlib.import_module(f"scenario_{plan['scenario']}")
        scenario.run(steps, plan.get("params", {}))
        ok = True
    except StepFailed:
        pass
    except Exception:  # noqa: BLE001 - the agent itself broke: say so, power off
        traceback.print_exc()
        with contextlib.suppress(Exception):
            ch.send({"ev": "error", "traceback": traceback.format_exc()[-6000:]})
    ch.send({"ev": "done", "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.modules["agent"] = sys.modules[
        __name__
    ]  # one module for the scenarios' imports
    sys.exit(main())
