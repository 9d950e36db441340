"""A fake SR plugin for the dispatcher's tests: one methodCall on stdin, one
methodResponse on stdout, and misbehaviour on demand.

Installed by the fixtures as ``<plugins>/FAKESR`` and ``<plugins>/OTHERSR``
(the type is taken from the executable's name).  Every run appends its pid to
``$FAKE_LOG_DIR/pids`` and "start/end <time> <pid>" lines to
``$FAKE_LOG_DIR/spans`` so tests can check overlap and leftovers.

Behaviour of VDI.stat by ``vdi``:
  ok          Success with a vdi_info (deterministic bytes)
  nap         sleeps 0.4 s, then Success
  sleep       sleeps 60 s
  grandchild  starts a grandchild (same group) that sleeps, then sleeps 60 s
  ignoreterm  ignores SIGTERM, then sleeps 60 s
  die         kills itself with SIGKILL
  garbage     prints garbage and exits 0
  fail        writes to stderr and exits 1
  nothing     prints nothing and exits 0
  leaver      starts a background child that keeps sleeping, answers Success
  fault       answers an XML-RPC fault
  missing     answers Failure Vdi_does_not_exist
  exit7       os._exit(7) without an answer
  leak        holds 96 MiB, then Success

``Probe.self`` answers what the process is: pids, process group, open file
descriptors (from /proc), environment, cwd, umask, signal dispositions and
mask, threads, a random number, argv: the same for a forked (warm) and an
executed plugin.  ``Echo.args`` answers its arguments and ``VERSION``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xmlrpc.client

SR_TYPE = os.path.basename(sys.argv[0]).removesuffix("SR").lower()
VERSION = 1
LOG_DIR = os.environ.get("FAKE_LOG_DIR", "")


def note(kind: str) -> None:
    if not LOG_DIR:
        return
    with open(os.path.join(LOG_DIR, "spans"), "a") as f:
        f.write(f"{kind} {time.time():.6f} {os.getpid()}\n")


def reply(value: object) -> None:
    sys.stdout.write(
        xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True)
    )
    sys.stdout.flush()


def success(value: object = "") -> None:
    reply({"Status": "Success", "Value": value})


def main() -> None:
    if LOG_DIR:
        with open(os.path.join(LOG_DIR, "pids"), "a") as f:
            f.write(f"{os.getpid()}\n")
    params, method = xmlrpc.client.loads(sys.stdin.read())
    arg = params[0] if params and isinstance(params[0], dict) else {}
    note("start")
    try:
        dispatch(method, arg)
    finally:
        note("end")


def dispatch(method: str | None, arg: dict) -> None:
    if method == "Query.query":
        success({"driver": SR_TYPE, "name": f"{SR_TYPE} fake", "version": "1.0"})
    elif method == "Query.diagnostics":
        success(f"{SR_TYPE} is fine")
    elif method == "SR.ls":
        success([f"{SR_TYPE}-sr1", "shared-sr"])
    elif method in ("SR.create", "SR.attach", "SR.detach", "SR.destroy"):
        if arg.get("sr") == "refuse":
            reply(
                {
                    "Status": "Failure",
                    "ErrorDescription": ["Backend_error", "REFUSED", "no"],
                }
            )
        else:
            success("")
    elif method == "Echo.args":
        success(
            {
                "type": SR_TYPE,
                "arg": arg,
                "root": os.environ.get("SM_ROOT", ""),
                "version": VERSION,
            }
        )
    elif method == "Probe.self":
        success(probe())
    elif method == "VDI.stat":
        stat(arg.get("vdi", ""), arg)
    else:
        reply({"Status": "Failure", "ErrorDescription": ["Unimplemented", str(method)]})


def probe() -> dict:
    import random
    import threading

    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory listing's own descriptor, closed by now
    mask = os.umask(0)
    os.umask(mask)
    names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignore"}
    dispositions = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(sig)
        except ValueError:
            continue
        if handler is signal.default_int_handler:
            dispositions[str(int(sig))] = "python-int"
        else:
            dispositions[str(int(sig))] = names.get(handler, "python")  # type: ignore[call-overload]
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "fds": fds,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": mask,
        "signals": dispositions,
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "threads": threading.active_count(),
        "random": str(random.getrandbits(64)),
        "argv": sys.argv,
        "name": __name__,
    }


def stat(vdi: str, arg: dict) -> None:
    info = {
        "vdi": vdi,
        "name_label": "d0",
        "virtual_size": 10 << 20,
        "sr": arg.get("sr", ""),
    }
    if vdi == "ok":
        success(info)
    elif vdi == "nap":
        time.sleep(0.4)
        success(info)
    elif vdi == "sleep":
        print("about to sleep for a minute", file=sys.stderr, flush=True)
        time.sleep(60)
    elif vdi == "grandchild":
        subprocess.Popen(["sleep", "61"])
        print("started a grandchild", file=sys.stderr, flush=True)
        time.sleep(60)
    elif vdi == "ignoreterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", file=sys.stderr, flush=True)
        time.sleep(60)
    elif vdi == "die":
        print("dying now", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif vdi == "garbage":
        sys.stdout.write("this is not XML at all\n")
    elif vdi == "fail":
        print("fake: the backend is on fire", file=sys.stderr, flush=True)
        sys.exit(1)
    elif vdi == "nothing":
        pass
    elif vdi == "leaver":
        subprocess.Popen(
            ["sleep", "62"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        success(info)
    elif vdi == "exit7":
        os._exit(7)
    elif vdi == "leak":
        hog = bytearray(96 << 20)
        hog[:: 4096] = b"x" * len(hog[:: 4096])
        success(info)
    elif vdi == "fault":
        sys.stdout.write(
            xmlrpc.client.dumps(
                xmlrpc.client.Fault(7, "fake fault"), methodresponse=True
            )
        )
    else:
        reply({"Status": "Failure", "ErrorDescription": ["Vdi_does_not_exist", vdi]})


if __name__ == "__main__":
    main()
