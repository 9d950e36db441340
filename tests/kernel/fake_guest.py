"""Stands in for qemu and the guest in the harness's own tests
(test_harness.py): connects to the control socket as qemu's chardev does,
writes a console, and runs the real agent's Steps over that channel, with
one of a few behaviours (argv: socket, console, behaviour)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "guest"))

import agent


def main(sock_path: str, console: str, behaviour: str) -> None:
    sys.stdout = open(console, "a", buffering=1)  # noqa: SIM115 - the process's console
    print("fake kernel: booting")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    ch = agent.Channel(s.fileno())
    ch.send({"ev": "hello", "uptime": 1.5, "kernel": "fake"})
    plan = ch.recv(30)["plan"]
    print(f"fake agent: plan {plan}")
    steps = agent.Steps(ch)
    try:
        with steps.step("fake: first") as r:
            r["scenario"] = plan["scenario"]
            agent.record("a call", 0.25)
        if behaviour == "fail":
            with steps.step("fake: second"):
                print("fake: the disk is on fire")
                raise RuntimeError("disk on fire")
        elif behaviour == "hang":
            with steps.step("fake: hangs"):
                time.sleep(3600)
        elif behaviour == "die":
            with steps.step("fake: dies"):
                print("fake: kernel panic")
                os._exit(3)
        steps.checkpoint("fake: look", {"what": "a disk"})
    except agent.StepFailed:
        ch.send({"ev": "done", "ok": False})
        return
    ch.send({"ev": "done", "ok": True})


if __name__ == "__main__":
    main(*sys.argv[1:4])
