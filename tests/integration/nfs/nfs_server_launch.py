"""Run rpcbind and nfs-ganesha inside a network namespace (test helper).

Started as ``ip netns exec NS python nfs_server_launch.py CONF LOG RUN ADDR``:
``ip netns exec`` gives this process a mount namespace of its own (slave to
the host's), where a fresh tmpfs goes over /run so rpcbind's socket, lock and
warm-start files (and ganesha's registration with it) never meet another
rpcbind of the machine.  Then rpcbind, then ganesha (both in the foreground,
children of this process, dying with it), each waited for (bounded).

It prints ``ready`` and then obeys one command per stdin line, answering one
line each: ``stop`` / ``start`` (ganesha only: a server stopped mid-session
and restarted), ``pause`` / ``resume`` (SIGSTOP/SIGCONT ganesha: a server that
stops answering), ``quit``.  At quit or end of input it stops everything it
started and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def child_setup() -> None:
    die_with_parent(signal.SIGKILL)


def wait_port(addr: str, port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((addr, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {addr}:{port}") from None
            time.sleep(0.02)


def wait_rpc(addr: str, program: str, deadline: float) -> None:
    while True:
        p = subprocess.run(
            ["rpcinfo", "-T", "tcp", addr, program, "3"],
            capture_output=True, timeout=5, check=False,
        )  # fmt: skip
        if p.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{program} 3 not registered: {p.stderr!r}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    conf, log, run, addr = sys.argv[1:5]
    die_with_parent()
    # SIGTERM (also sent when the test process dies): stop the daemons first.
    # rpcbind drops to user _rpc, which clears its own parent-death signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run"], check=True)
    os.makedirs("/run/rpcbind", exist_ok=True)
    with open(os.path.join(run, "rpcbind.err"), "wb") as err:
        rpcbind = subprocess.Popen(
            ["rpcbind", "-f", "-w"], preexec_fn=child_setup,  # noqa: PLW1509
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    wait_port(addr, 111, time.monotonic() + 10)
    ganesha: subprocess.Popen[bytes] | None = None

    def start_ganesha() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", conf, "-L", log,
             "-p", os.path.join(run, "ganesha.pid"), "-N", "NIV_EVENT"],
            preexec_fn=child_setup,  # noqa: PLW1509
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        wait_port(addr, 2049, deadline)
        wait_rpc(addr, "mountd", deadline)
        return p

    try:
        ganesha = start_ganesha()
        print(f"ready {ganesha.pid}", flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stop":
                stop(ganesha)
                ganesha = None
            elif cmd == "start":
                if ganesha is None:
                    ganesha = start_ganesha()
            elif cmd == "pause" and ganesha is not None:
                ganesha.send_signal(signal.SIGSTOP)
            elif cmd == "resume" and ganesha is not None:
                ganesha.send_signal(signal.SIGCONT)
            elif cmd == "quit":
                break
            print(f"ok {cmd} {ganesha.pid if ganesha else 0}", flush=True)
    finally:
        stop(ganesha)
        stop(rpcbind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
