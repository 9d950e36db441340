"""The ``vhd`` command: every operation of ``smcommon.vhd`` from a shell.

Owns argument parsing (sizes with suffixes: 512, 10K, 512M, 10G, 2T; binary
units), the two output forms (readable tables for people, ``--json`` for
programs) and exit codes: 0 success, 1 an operation failed (one line on
stderr, never a traceback), 2 bad usage, 3 ``check`` found problems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from smcommon import sizes
from smcommon.errors import Error
from smcommon.vhd import ops, transfer
from smcommon.vhd.check import check as check_image
from smcommon.vhd.create import create as create_image
from smcommon.vhd.create import snapshot as snapshot_image
from smcommon.vhd.errors import InvalidArgument
from smcommon.vhd.image import Info, open_image
from smcommon.vhd.repair import repair as repair_image

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PROBLEMS = 0, 1, 2, 3
CHUNK = 8 * 1024 * 1024
def _print_info(info: Info, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    d = info.to_dict()
    for key in ("virtual_size", "physical_size", "block_size"):
        value = int(d[key])  # type: ignore[call-overload]
        d[key] = f"{value} ({sizes.format(value)})"
    width = max(len(k) for k in d)
    for key, value in d.items():
        print(f"{key:<{width}}  {'-' if value is None else value}")


def _lines(items: list[str], as_json: bool, key: str, empty: str) -> None:
    if as_json:
        print(json.dumps({key: items}))
    elif items:
        print("\n".join(items))
    else:
        print(empty)


def cmd_create(a: argparse.Namespace) -> int:
    _print_info(create_image(a.path, a.size, fixed=a.fixed, max_size=a.max_size), a.json)
    return EXIT_OK


def cmd_snapshot(a: argparse.Namespace) -> int:
    _print_info(snapshot_image(a.parent, a.child, search_dirs=a.search_dir), a.json)
    return EXIT_OK


def cmd_info(a: argparse.Namespace) -> int:
    _print_info(ops.info(a.path, search_dirs=a.search_dir), a.json)
    return EXIT_OK


def cmd_chain(a: argparse.Namespace) -> int:
    _lines(ops.chain(a.path, search_dirs=a.search_dir), a.json, "chain", "")
    return EXIT_OK


def cmd_read(a: argparse.Namespace) -> int:
    with open_image(a.path, search_dirs=a.search_dir) as img:
        length = img.virtual_size - a.offset if a.length is None else a.length
        if a.offset > img.virtual_size or length < 0 or a.offset + length > img.virtual_size:
            raise InvalidArgument(f"{a.path}: offset {a.offset} (length {a.length}) goes past "
                                  f"the disk size {img.virtual_size}")
        out = open(a.output, "wb") if a.output else sys.stdout.buffer  # noqa: SIM115
        try:
            pos = a.offset
            while pos < a.offset + length:
                n = min(CHUNK, a.offset + length - pos)
                out.write(img.read(pos, n))
                pos += n
            out.flush()
        finally:
            if a.output:
                out.close()
    return EXIT_OK


def cmd_write(a: argparse.Namespace) -> int:
    src = open(a.input, "rb") if a.input else sys.stdin.buffer  # noqa: SIM115
    total = 0
    try:
        with open_image(a.path, writable=True, search_dirs=a.search_dir) as img:
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                img.write(a.offset + total, data)
                total += len(data)
    finally:
        if a.input:
            src.close()
    if a.json:
        print(json.dumps({"written": total, "offset": a.offset}))
    else:
        print(f"wrote {total} bytes at offset {a.offset}")
    return EXIT_OK


def cmd_set_hidden(a: argparse.Namespace) -> int:
    hidden = a.value.lower() in ("1", "true", "yes", "on")
    ops.set_hidden(a.path, hidden)
    print(json.dumps({"hidden": hidden}) if a.json else f"hidden: {hidden}")
    return EXIT_OK


def cmd_set_parent(a: argparse.Namespace) -> int:
    ops.set_parent(a.child, a.parent, search_dirs=a.search_dir)
    _print_info(ops.info(a.child, search_dirs=a.search_dir), a.json)
    return EXIT_OK


def cmd_coalesce(a: argparse.Namespace) -> int:
    n = ops.coalesce(a.child, search_dirs=a.search_dir)
    print(json.dumps({"copied": n}) if a.json else f"copied {n} bytes into the parent")
    return EXIT_OK


def cmd_resize(a: argparse.Namespace) -> int:
    _print_info(ops.resize(a.path, a.size, search_dirs=a.search_dir), a.json)
    return EXIT_OK


def cmd_check(a: argparse.Namespace) -> int:
    problems = check_image(a.path, search_dirs=a.search_dir)
    _lines(problems, a.json, "problems", f"{a.path}: ok")
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_repair(a: argparse.Namespace) -> int:
    _lines(repair_image(a.path), a.json, "repaired", f"{a.path}: nothing to repair")
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    transfer.export_raw(a.path, a.dest, search_dirs=a.search_dir)
    return EXIT_OK


def cmd_import(a: argparse.Namespace) -> int:
    _print_info(transfer.import_raw(a.src, a.path, fixed=a.fixed), a.json)
    return EXIT_OK


def cmd_convert(a: argparse.Namespace) -> int:
    _print_info(transfer.convert(a.src, a.dest, search_dirs=a.search_dir), a.json)
    return EXIT_OK


def cmd_map(a: argparse.Namespace) -> int:
    extents = ops.allocation_map(a.path, search_dirs=a.search_dir)
    if a.json:
        print(json.dumps([{"offset": o, "length": n, "depth": d} for o, n, d in extents]))
        return EXIT_OK
    print(f"{'offset':>16} {'length':>16}  depth")
    for o, n, d in extents:
        print(f"{o:>16} {n:>16}  {d if d else '-'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhd", description="Create, inspect and change VHD images "
                                "(fixed, dynamic, differencing) and their chains.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            chain: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", help="machine-readable JSON output")
        if chain:
            sp.add_argument("--search-dir", action="append", metavar="DIR",
                            help="a directory where parents may be (repeatable; default: "
                                 "each child's own directory)")
        return sp

    sp = add("create", cmd_create, "create an empty image (size rounded up to 2 MiB)", False)
    sp.add_argument("path")
    sp.add_argument("size", type=sizes.arg, help="virtual size, e.g. 10G")
    sp.add_argument("--fixed", action="store_true", help="a fixed (preallocated) image")
    sp.add_argument("--max-size", type=sizes.arg, help="reserve BAT room up to this size")
    sp = add("snapshot", cmd_snapshot, "create an empty differencing child of PARENT")
    sp.add_argument("parent")
    sp.add_argument("child")
    sp = add("info", cmd_info, "show an image's size, type, parent, flags")
    sp.add_argument("path")
    sp = add("chain", cmd_chain, "list the image and its parents, leaf first")
    sp.add_argument("path")
    sp = add("read", cmd_read, "read bytes of the virtual disk (whole chain)")
    sp.add_argument("path")
    sp.add_argument("--offset", type=sizes.arg, default=0)
    sp.add_argument("--length", type=sizes.arg, help="default: to the end of the disk")
    sp.add_argument("--output", "-o", help="file to write to (default: stdout)")
    sp = add("write", cmd_write, "write bytes from a file or stdin into the disk")
    sp.add_argument("path")
    sp.add_argument("--offset", type=sizes.arg, default=0)
    sp.add_argument("--input", "-i", help="file to read from (default: stdin)")
    sp = add("set-hidden", cmd_set_hidden, "set or clear the hidden flag", False)
    sp.add_argument("path")
    sp.add_argument("value", nargs="?", default="true", choices=(
        "true", "false", "on", "off", "yes", "no", "1", "0"))
    sp = add("set-parent", cmd_set_parent, "re-link a differencing image to PARENT")
    sp.add_argument("child")
    sp.add_argument("parent")
    sp = add("coalesce", cmd_coalesce, "copy a child's data into its parent (restartable)")
    sp.add_argument("child")
    sp = add("resize", cmd_resize, "grow (or shrink, if no data is lost) the virtual size")
    sp.add_argument("path")
    sp.add_argument("size", type=sizes.arg)
    sp = add("check", cmd_check, "check every structural rule; exit 3 if problems")
    sp.add_argument("path")
    sp = add("repair", cmd_repair, "restore a damaged footer from its copy", False)
    sp.add_argument("path")
    sp = add("export", cmd_export, "write the whole disk to a raw file")
    sp.add_argument("path")
    sp.add_argument("dest")
    sp = add("import", cmd_import, "make an image from a raw file (zero blocks unallocated)",
             False)
    sp.add_argument("src")
    sp.add_argument("path")
    sp.add_argument("--fixed", action="store_true")
    sp = add("convert", cmd_convert, "flatten a chain into a new dynamic image")
    sp.add_argument("src")
    sp.add_argument("dest")
    sp = add("map", cmd_map, "show which image of the chain holds each extent")
    sp.add_argument("path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("search_dir",):
        if not hasattr(args, name):
            setattr(args, name, None)
    func: Any = args.func
    try:
        return int(func(args))
    except Error as exc:
        print(f"vhd {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"vhd {args.command}:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"vhd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- a bug: still one line, never a traceback
        print(f"vhd {args.command}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
