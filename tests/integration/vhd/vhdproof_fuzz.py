"""The fuzz worker: runs every read-side operation of ``smcommon.vhd`` on a list
of (possibly corrupt) images, in its own process, and reports per case as JSON.

Run as ``python vhdproof_fuzz.py CASES.json RESULT.json``.  Each operation gets
an alarm (a hang becomes outcome "hang"), the address space is capped (a huge
allocation becomes MemoryError, outcome "crash"), and each outcome is one of:
"ok", "error" (a ``smcommon.errors.Error`` with its class, code and message),
"crash" (any other exception, with its traceback) or "hang".
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import traceback
from typing import Any

PER_OP_SECONDS = 10
MEMORY_CAP = 2 * 1024**3
EXPORT_MAX = 64 * 1024 * 1024


class Hang(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang()


def run_case(vhd: Any, errors: Any, path: str, scratch: str) -> list[dict[str, str]]:
    size: int | None = None

    def info() -> object:
        nonlocal size
        i = vhd.info(path)
        size = i.virtual_size
        return i.to_dict()

    def read_head() -> object:
        n = min(size or 1 << 20, 1 << 20)
        return len(vhd.read(path, 0, n))

    def read_tail() -> object:
        if not size:
            return None
        n = min(size, 1 << 20)
        return len(vhd.read(path, size - n, n))

    def export() -> object:
        if size is None or size > EXPORT_MAX:
            return "skipped"
        dest = os.path.join(scratch, "export.raw")
        try:
            vhd.export_raw(path, dest)
        finally:
            if os.path.exists(dest):
                os.unlink(dest)
        return "exported"

    ops = [
        ("info", info),
        ("chain", lambda: vhd.chain(path)),
        ("check", lambda: vhd.check(path)),
        ("allocation_map", lambda: len(vhd.allocation_map(path))),
        ("read_head", read_head),
        ("read_tail", read_tail),
        ("export_raw", export),
        # last, as they change the file: a write, then repair
        ("write", lambda: vhd.write(path, 0, b"fuzz" * 128)),
        ("repair", lambda: vhd.repair(path)),
    ]
    out = []
    for name, op in ops:
        rec = {"op": name}
        signal.alarm(PER_OP_SECONDS)
        try:
            result = op()
            rec.update(outcome="ok", detail=repr(result)[:300])
        except errors.Error as exc:
            rec.update(
                outcome="error",
                cls=type(exc).__name__,
                code=str(getattr(exc, "code", "")),
                detail=str(exc),
            )
        except Hang:
            rec.update(outcome="hang", detail=f"no answer within {PER_OP_SECONDS}s")
        except BaseException as exc:  # noqa: BLE001 - reporting is the point
            rec.update(
                outcome="crash",
                cls=type(exc).__name__,
                detail=traceback.format_exc()[-3000:],
            )
        finally:
            signal.alarm(0)
        out.append(rec)
    return out


def main() -> int:
    cases_file, result_file = sys.argv[1], sys.argv[2]
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    signal.signal(signal.SIGALRM, _alarm)
    from smcommon import errors, vhd

    with open(cases_file) as f:
        cases = json.load(f)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vhdfuzz-") as scratch:
        for case in cases:
            results[case["name"]] = run_case(vhd, errors, case["path"], scratch)
            with open(
                result_file, "w"
            ) as f:  # partial results survive a crash of the worker
                json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
