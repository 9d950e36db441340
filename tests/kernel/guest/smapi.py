"""Calls to the real plugin executables from the guest, as the toolstack
makes them: one process per call, an XML-RPC request on stdin, one response
on stdout (``xmlrpc.client`` builds and parses them, as in the ext suite)."""

from __future__ import annotations

import os
import subprocess
import time
import xmlrpc.client
from typing import Any

from agent import record

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)
CALL_TIMEOUT = 300.0
EXECUTABLES = {"lvmoiscsi": "LVMoISCSISR"}  # the others: plugins/<type>/<TYPE>SR


class SmapiError(Exception):
    """A call answered Failure (or broke): the method, the ErrorDescription."""

    def __init__(self, method: str, error: list[str], stderr: str = "") -> None:
        self.method = method
        self.error = error
        self.stderr = stderr
        super().__init__(
            f"{method}: {error}" + (f"\nstderr: {stderr[-1500:]}" if stderr else "")
        )


class Plugin:
    """One SR type's executable, e.g. ``Plugin("ext")`` -> plugins/ext/EXTSR."""

    def __init__(self, sr_type: str, dbg: str = "kernel-tier") -> None:
        name = EXECUTABLES.get(sr_type, f"{sr_type.upper()}SR")
        self.path = os.path.join(REPO, "plugins", sr_type, name)
        self.dbg = dbg

    def call(self, method: str, **args: Any) -> tuple[bool, Any, str]:
        """(ok, Value or ErrorDescription, stderr); AssertionError if the
        process or the response breaks the wire rules."""
        args.setdefault("dbg", self.dbg)
        req = xmlrpc.client.dumps((args,), methodname=method)
        t = time.monotonic()
        p = subprocess.run(
            [self.path],
            check=False,
            input=req,
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT,
        )
        record(method, time.monotonic() - t)
        if p.returncode != 0 or "Traceback" in p.stdout:
            raise AssertionError(
                f"{method}: exit {p.returncode}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-2000:]}"
            )
        (body,), _ = xmlrpc.client.loads(p.stdout)
        assert isinstance(body, dict), (
            f"{method}: the response is not a struct: {body!r}"
        )
        if body.get("Status") == "Success":
            return True, body.get("Value"), p.stderr
        desc = body.get("ErrorDescription")
        if not (
            isinstance(desc, list) and desc and all(isinstance(x, str) for x in desc)
        ):
            raise AssertionError(f"{method}: malformed failure {body!r}")
        return False, desc, p.stderr

    def ok(self, method: str, **args: Any) -> Any:
        ok, value, err = self.call(method, **args)
        if not ok:
            raise SmapiError(method, value, err)
        return value

    def err(self, method: str, **args: Any) -> list[str]:
        """The ErrorDescription of a call that must fail."""
        ok, value, _ = self.call(method, **args)
        if ok:
            raise AssertionError(
                f"{method} {args!r} should have failed; it answered {value!r}"
            )
        return list(value)


def mounts() -> list[tuple[str, str, str]]:
    """(device, mountpoint, fstype) of /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            out.append((dev.replace("\\040", " "), mnt.replace("\\040", " "), fstype))
    return out
