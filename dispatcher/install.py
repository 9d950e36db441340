"""``sm-install-plugins DEST``: install the plugins so that they run the package's interpreter.

A plugin executable starts with ``#!/usr/bin/env python3``: run by hand (or by
a toolstack), it gets whatever ``python3`` comes first on PATH, which may be a
version manager's shim (~70 ms more per start) and not the interpreter this
package is installed in, where ``smcommon`` is.  This command copies each
plugin directory (``<plugins>/<type>/``: the ``<TYPE>SR`` executable and the
modules beside it) to ``DEST/<type>/``, with that first line rewritten to this
interpreter (``sys.executable``, keeping any flags), so an installed plugin
needs nothing from PATH.  The dispatcher does the same for the plugins it runs
(``dispatcher.warm.interpreter``).  Files are replaced atomically; other files
in DEST are left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

ENV_SHEBANG = b"#!/usr/bin/env python"


def rewrite(first_line: bytes, interpreter: str) -> bytes:
    """``#!/usr/bin/env python3 [flags]`` -> ``#!<interpreter> [flags]``; other lines unchanged."""
    if not first_line.startswith(ENV_SHEBANG):
        return first_line
    words = first_line[2:].split()
    flags = b" ".join(words[2:])
    return b"#!" + interpreter.encode() + (b" " + flags if flags else b"") + b"\n"


def install(src: Path, dest: Path, interpreter: str) -> list[Path]:
    """Copy every plugin directory of ``src`` into ``dest``; the executables installed."""
    done = []
    for tdir in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        exes = [f for f in tdir.iterdir() if f.name.endswith("SR") and f.name[:-2].isupper()]
        if not exes:
            continue
        out = dest / tdir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tdir.iterdir()):
            if not f.is_file() or f.suffix == ".pyc":
                continue
            data = f.read_bytes()
            if f in exes:
                first, nl, rest = data.partition(b"\n")
                data = rewrite(first + nl, interpreter) + rest
            tmp = out / f".{f.name}.tmp"
            tmp.write_bytes(data)
            shutil.copymode(f, tmp)
            os.replace(tmp, out / f.name)
            if f in exes:
                done.append(out / f.name)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sm-install-plugins", description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="where to install (e.g. /usr/libexec/sm/plugins)")
    p.add_argument(
        "--from",
        dest="src",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "plugins",
        help="the plugins to install (default: this checkout's plugins/)",
    )
    args = p.parse_args(argv)
    if not args.src.is_dir():
        p.error(f"{args.src} is not a directory")
    for exe in install(args.src, args.dest, sys.executable):
        print(exe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
