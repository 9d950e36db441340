"""Run requests through a plugin as its warm parent's children would, and
print (JSON) what each one imported that the warm parent had not.

    python warm_imports_probe.py PLUGIN REQUESTS.json

REQUESTS.json: a list of XML-RPC request bodies.  Prints ``{"unknown": [...],
"calls": [{"imported": [...], "response": "..."}]}``: ``unknown``, the names
in a ``WARM_IMPORTS`` list that did not import.  Each call runs in a process
forked from this one after ``dispatcher.zygote.load``, as in the dispatcher.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types

from dispatcher import zygote


def run(
    code: types.CodeType, plugin: str, body: bytes, warm: set[str]
) -> dict[str, object]:
    with tempfile.TemporaryFile() as out:
        report_r, report_w = os.pipe()
        body_r, body_w = os.pipe()
        os.write(body_w, body)  # below a pipe's capacity
        os.close(body_w)
        pid = os.fork()
        if pid == 0:
            os.dup2(body_r, 0)
            os.dup2(out.fileno(), 1)
            sys.stdin, sys.stdout = open(0), open(1, "w")  # noqa: SIM115
            main = types.ModuleType("__main__")
            main.__file__ = plugin
            sys.modules["__main__"] = main
            try:
                exec(code, main.__dict__)  # noqa: S102 -- as the warm parent's child does
            except SystemExit:
                pass
            sys.stdout.flush()
            os.write(report_w, json.dumps(sorted(set(sys.modules) - warm)).encode())
            os._exit(0)
        os.close(report_w)
        os.close(body_r)
        report = b""
        while chunk := os.read(report_r, 1 << 16):
            report += chunk
        os.close(report_r)
        os.waitpid(pid, 0)
        out.seek(0)
        return {"imported": json.loads(report), "response": out.read().decode()}


def main() -> None:
    plugin, requests = sys.argv[1:3]
    with open(requests) as f:
        bodies = [b.encode() for b in json.load(f)]
    code = zygote.load(plugin)
    warm = set(sys.modules)
    named = {
        str(name)
        for mod in list(sys.modules.values())
        for name in (getattr(mod, "WARM_IMPORTS", None) or [])
    }
    unknown = sorted(n for n in named if n not in sys.modules and not _attribute(n))
    print(
        json.dumps(
            {"unknown": unknown, "calls": [run(code, plugin, b, warm) for b in bodies]}
        )
    )


def _attribute(name: str) -> bool:
    """``a.b`` where ``b`` is a name in module ``a`` (from a import b)."""
    mod, _, attr = name.rpartition(".")
    return mod in sys.modules and hasattr(sys.modules[mod], attr)


if __name__ == "__main__":
    main()
