"""``smctl``: the storage manager for people (and scripts).

Owns the command line: one subcommand per SR/VDI operation, talking to the
dispatcher (its Unix socket by default, ``--socket PATH`` or ``--url URL``:
``https://`` with this client's certificate, ``--tls-*`` or ``$SM_TLS_*`` or
the host's pool.json, see ``dispatcher.client``)
or running the plugin directly (``--direct``: the same routing as the daemon,
in this process, no daemon needed).

Output: tables and ``key: value`` lines for people; ``--json`` prints the
result's value as JSON (on failure, the response struct) for scripts.  Long
commands (a copy, a destroy that may coalesce ...) draw a progress bar on
stderr while they run, when stderr is a terminal and ``--json`` is not given
(``dispatcher.smctl_progress``).  An
error is one line on stderr (``smctl: error: ...``) plus indented detail.

Exit codes (stable, for scripts):
    0  success
    1  the storage manager answered with a failure (or a fault)
    2  usage: bad arguments
    3  cannot reach the dispatcher (or, with --direct, no such plugin)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smcommon import sizes

from dispatcher import client, wire
from dispatcher.smctl_progress import LONG_COMMANDS, ProgressBar
from dispatcher.smctl_show import explain, show

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3


EPILOG = """\
exit codes: 0 success; 1 the storage manager answered with a failure; 2 bad
arguments; 3 cannot reach the dispatcher (or no such plugin with --direct).

cancelling: `smctl cancel TASK` cancels the running call whose dbg is TASK
(the dispatcher's Dispatcher.cancel({"dbg", "task"}) method): its plugin gets
SIGTERM, then SIGKILL after a grace period, and its caller gets Cancelled.
Give your own calls a dbg with --dbg to be able to cancel them.

examples:
  smctl sr-create ext --path /srv/sr1
  VDI=$(smctl -q vdi-create <sr> --name d0 --size 10G)
  smctl vdi-list <sr>
  smctl --json vdi-stat <sr> <vdi>
"""


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("true", "yes", "on", "1"):
        return True
    if t in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


# -- the commands ---------------------------------------------------------------

# name -> (method, help, argument adders); arguments are added by small helpers
Spec = tuple[str, str, list[str]]

COMMANDS: dict[str, Spec] = {
    "query": (
        "Query.query",
        "describe the plugins (or one SR type's plugin)",
        ["type?"],
    ),
    "diagnostics": (
        "Query.diagnostics",
        "diagnostics of the dispatcher and plugins",
        ["type?"],
    ),
    "sr-ls": ("SR.ls", "list the attached SRs", ["type?"]),
    "sr-create": (
        "SR.create",
        "create an SR (and attach it, unless --no-attach)",
        ["type", "dc", "sr-opt", "size-opt"],
    ),
    "sr-attach": ("SR.attach", "attach an SR", ["sr", "dc", "type-opt"]),
    "sr-detach": ("SR.detach", "detach an SR", ["sr", "type-opt"]),
    "sr-destroy": ("SR.destroy", "destroy an SR", ["sr", "type-opt"]),
    "sr-reset": ("SR.reset", "reset an SR's state on this host", ["sr", "type-opt"]),
    "sr-scan": ("SR.scan", "list an SR's VDIs (table)", ["sr", "type-opt"]),
    "vdi-list": (
        "SR.scan",
        "list an SR's VDIs (table); the same as sr-scan",
        ["sr", "type-opt"],
    ),
    "vdi-create": ("VDI.create", "create a VDI", ["sr", "vdi-new", "type-opt"]),
    "vdi-stat": ("VDI.stat", "show one VDI", ["sr", "vdi", "type-opt"]),
    "vdi-destroy": ("VDI.destroy", "destroy a VDI", ["sr", "vdi", "type-opt"]),
    "vdi-snapshot": (
        "VDI.snapshot",
        "snapshot a VDI",
        ["sr", "vdi", "name-opt", "type-opt"],
    ),
    "vdi-clone": ("VDI.clone", "clone a VDI", ["sr", "vdi", "name-opt", "type-opt"]),
    "vdi-attach": (
        "VDI.attach",
        "attach a VDI for datapath --dp",
        ["sr", "vdi", "dp", "ro-opt", "type-opt"],
    ),
    "vdi-activate": (
        "VDI.activate",
        "activate a VDI for datapath --dp",
        ["sr", "vdi", "dp", "type-opt"],
    ),
    "vdi-deactivate": (
        "VDI.deactivate",
        "deactivate a VDI for datapath --dp",
        ["sr", "vdi", "dp", "type-opt"],
    ),
    "vdi-detach": (
        "VDI.detach",
        "detach a VDI for datapath --dp",
        ["sr", "vdi", "dp", "type-opt"],
    ),
    "vdi-set-persistent": (
        "VDI.set_persistent",
        "set a VDI (non-)persistent",
        ["sr", "vdi", "persistent", "type-opt"],
    ),
    "vdi-epoch-begin": (
        "VDI.epoch_begin",
        "a VDI is about to be used by a fresh VM",
        ["sr", "vdi", "type-opt"],
    ),
    "vdi-epoch-end": (
        "VDI.epoch_end",
        "a VDI's VM is shutting down",
        ["sr", "vdi", "type-opt"],
    ),
    "vdi-get-url": (
        "VDI.get_url",
        "a URL for the VDI's data",
        ["sr", "vdi", "type-opt"],
    ),
    "vdi-copy": (
        "VDI.copy",
        "copy a VDI to another SR of this host, or of another (--remote)",
        ["sr", "vdi", "copy", "type-opt"],
    ),
    "vdi-compose": (
        "VDI.compose",
        "layer VDI2's updates onto VDI1",
        ["sr", "vdi1", "vdi2", "type-opt"],
    ),
    "vdi-similar-content": (
        "VDI.similar_content",
        "VDIs with similar content (table)",
        ["sr", "vdi", "type-opt"],
    ),
    "vdi-set-content-id": (
        "VDI.set_content_id",
        "set a VDI's content_id",
        ["sr", "vdi", "content-id", "type-opt"],
    ),
    "vdi-get-by-name": (
        "VDI.get_by_name",
        "find a VDI by name",
        ["sr", "name", "type-opt"],
    ),
    "sr-stat": (
        "SR.stat",
        "an SR's space: total, free, used by VDIs, hidden parents and garbage",
        ["sr", "type-opt"],
    ),
    "gc": ("SR.gc", "collect garbage in an SR now (ext)", ["sr", "type-opt"]),
    "status": (
        "Dispatcher.status",
        "the dispatcher's plugins, SRs and running calls",
        [],
    ),
    "cancel": (
        "Dispatcher.cancel",
        "cancel the running call whose dbg is TASK",
        ["task"],
    ),
}


def _add_args(p: argparse.ArgumentParser, kinds: list[str]) -> None:
    adders: dict[str, Callable[[], Any]] = {
        "type?": lambda: p.add_argument(
            "type", nargs="?", help="SR type (default: every plugin)"
        ),
        "type": lambda: p.add_argument("type", help="SR type, e.g. ext"),
        "type-opt": lambda: p.add_argument(
            "--type", dest="type", help="SR type (default: what the dispatcher learnt)"
        ),
        "sr": lambda: p.add_argument("sr", help="the SR (uuid)"),
        "sr-opt": lambda: (
            p.add_argument(
                "--sr", dest="sr", help="the new SR's uuid (default: a new one)"
            ),
            p.add_argument(
                "--no-attach", action="store_true", help="only create, do not attach"
            ),
        ),
        "size-opt": lambda: p.add_argument(
            "--size", type=sizes.arg, default=0, help="physical size (e.g. 10G)"
        ),
        "dc": lambda: (
            p.add_argument("--path", help="device_config path (a directory or device)"),
            p.add_argument(
                "-o",
                "--device-config",
                dest="dc",
                type=_kv,
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="a device_config entry (repeatable)",
            ),
        ),
        "vdi": lambda: p.add_argument("vdi", help="the VDI"),
        "vdi1": lambda: p.add_argument("vdi1", help="the VDI to layer onto"),
        "vdi2": lambda: p.add_argument(
            "vdi2", help="the VDI whose updates are layered (modified)"
        ),
        "vdi-new": lambda: (
            p.add_argument("--name", required=True, help="name_label"),
            p.add_argument(
                "--size", required=True, type=sizes.arg, help="virtual size (e.g. 10G)"
            ),
            p.add_argument("--description", default="", help="name_description"),
            p.add_argument(
                "--vdi-type", dest="ty", default="user", help="ty (default user)"
            ),
            p.add_argument("--read-only", action="store_true"),
            p.add_argument("--non-persistent", action="store_true"),
            p.add_argument(
                "--sm-config",
                type=_kv,
                action="append",
                default=[],
                metavar="KEY=VALUE",
            ),
        ),
        "name-opt": lambda: p.add_argument("--name", help="name_label of the new VDI"),
        "name": lambda: p.add_argument("name", help="the name_label to look for"),
        "dp": lambda: p.add_argument(
            "--dp", default="smctl", help="datapath (default smctl)"
        ),
        "ro-opt": lambda: p.add_argument(
            "--read-only", action="store_true", help="attach read-only"
        ),
        "persistent": lambda: p.add_argument(
            "persistent", type=_bool, help="true or false"
        ),
        "copy": lambda: (
            p.add_argument(
                "--dest", required=True, help="the destination SR (uuid)"
            ),
            p.add_argument(
                "--remote",
                metavar="URL",
                default="",
                help="copy to another host: a peer's URL as this host's pool.json lists "
                "it, e.g. https://host-b:8443/ (default: an SR of this host)",
            ),
        ),
        "content-id": lambda: p.add_argument("content_id", help="the new content_id"),
        "task": lambda: p.add_argument("task", help="the dbg of the call to cancel"),
    }
    for kind in kinds:
        adders[kind]()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smctl",
        description="Talk to the storage manager: through the dispatcher (default: its Unix "
        "socket), or straight to a plugin (--direct).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        type=Path,
        help=f"the dispatcher's socket (default {client.default_socket()})",
    )
    where.add_argument(
        "--url",
        help="the dispatcher's URL: https://HOST:PORT/ (mutual TLS), or http:// for a "
        "dispatcher run --insecure on loopback",
    )
    where.add_argument(
        "--direct",
        action="store_true",
        help="run the plugin here, without the dispatcher",
    )
    p.add_argument(
        "--plugins-dir",
        type=Path,
        help="with --direct: where <TYPE>SR executables live",
    )
    tls = p.add_argument_group(
        "TLS (--url https://...)",
        "this client's certificate, key and the pool's CA; default $SM_TLS_CERT, "
        "$SM_TLS_KEY, $SM_TLS_CA, else the host's pool.json (<etc_dir>/pool.json)",
    )
    tls.add_argument("--tls-cert", help="this client's certificate (PEM)")
    tls.add_argument("--tls-key", help="its private key (PEM)")
    tls.add_argument("--tls-ca", help="the CA the dispatcher's certificate is signed by (PEM)")
    tls.add_argument(
        "--tls-server-name",
        help="the name the dispatcher's certificate must carry (default: the URL's host; "
        "$SM_TLS_SERVER_NAME)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the key of the result (the new VDI's or SR's uuid), for scripts",
    )
    p.add_argument(
        "--dbg",
        default=None,
        help="the call's debug id (default smctl-<pid>); cancel it by this",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (method, helptext, kinds) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=f"{helptext} ({method})")
        _add_args(sp, kinds)
    return p


def _device_config(ns: argparse.Namespace) -> dict[str, str]:
    dc = dict(getattr(ns, "dc", []) or [])
    if getattr(ns, "path", None):
        dc["path"] = ns.path
    return dc


# argument kinds that are plain inputs of the method, and their input name
_POSITIONAL_KEYS = {
    "sr": "sr",
    "vdi": "vdi",
    "vdi1": "vdi1",
    "vdi2": "vdi2",
    "name": "name",
    "content-id": "content_id",
    "task": "task",
    "persistent": "persistent",
}


def build_call(ns: argparse.Namespace, dbg: str) -> tuple[str, dict[str, Any]]:
    """The method and the argument struct of a parsed command."""
    method, _help, kinds = COMMANDS[ns.command]
    args: dict[str, Any] = {"dbg": dbg}
    for kind in kinds:
        key = _POSITIONAL_KEYS.get(kind)
        if key is not None:
            args[key] = getattr(ns, key)
    if ns.command == "sr-create":
        args["sr"] = ns.sr or str(uuid.uuid4())
        args["device_config"] = _device_config(ns)
        args["physical_size"] = ns.size
    elif ns.command == "sr-attach":
        args["device_config"] = _device_config(ns)
    elif ns.command == "vdi-create":
        args["vdi_info"] = {
            "name_label": ns.name,
            "name_description": ns.description,
            "ty": ns.ty,
            "virtual_size": ns.size,
            "read_only": ns.read_only,
            "persistent": not ns.non_persistent,
            "sm_config": dict(ns.sm_config),
        }
    elif ns.command in ("vdi-snapshot", "vdi-clone"):
        args["vdi_info"] = {"vdi": args.pop("vdi")}
        if ns.name:
            args["vdi_info"]["name_label"] = ns.name
    elif ns.command in ("vdi-attach", "vdi-activate", "vdi-deactivate", "vdi-detach"):
        args["dp"] = ns.dp
        if ns.command == "vdi-attach":
            args["read_write"] = not ns.read_only
    elif ns.command == "vdi-copy":
        args["url"] = ns.remote
        args["dest"] = ns.dest
    return method, args


# -- talking --------------------------------------------------------------------


class Target:
    """Where calls go: the dispatcher (socket/URL) or the plugins here (--direct)."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.direct = ns.direct
        self._local: Any = None
        if self.direct:
            from smcommon.paths import Paths

            from dispatcher.core import Config, Dispatcher
            from dispatcher.routes import RouteTable
            from dispatcher.server import default_plugins_dir

            plugins = (ns.plugins_dir or default_plugins_dir()).resolve()
            config = Config(
                plugins_dir=plugins, timeout=ns.timeout or 300.0, env=dict(os.environ)
            )
            self._local = Dispatcher(config, RouteTable.for_host(Paths.from_env()))
        else:
            tls = None
            if ns.url and ns.url.startswith("https://"):
                tls = client.tls_context(ns.tls_cert, ns.tls_key, ns.tls_ca)
            where = ns.url or ns.socket
            name = ns.tls_server_name
            self._client = client.Client(where, ns.timeout, tls=tls, server_name=name)
            self._watcher = client.Client(where, 10, tls=tls, server_name=name)

    def status(self) -> dict[str, Any]:
        """``Dispatcher.status`` (from any thread): the progress bar's view."""
        if self._local is not None:
            return dict(self._local.status())
        resp = wire.parse_response(
            self._watcher.post("/", wire.dumps_call("Dispatcher.status", {"dbg": "smctl"}))
        )
        value = resp.value.get("Value") if resp.status == "Success" else None
        return value if isinstance(value, dict) else {}

    def call(
        self, method: str, args: dict[str, Any], sr_type: str | None
    ) -> wire.Response:
        route = f"/{sr_type}" if sr_type else "/"
        body = wire.dumps_call(method, args)
        if self._local is not None:
            if sr_type and self._local.plugin_path(sr_type) is None:
                known = ", ".join(self._local.plugin_types()) or "none"
                raise client.ConnectError(
                    f"no plugin for SR type {sr_type!r} in {self._local.config.plugins_dir} (known: {known})"
                )
            out, _fields = self._local.handle(sr_type, body)
            return wire.parse_response(out)
        return wire.parse_response(self._client.post(route, body))


# -- main -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(sizes.join_option_values(words, {"--size"}))
    dbg = ns.dbg or f"smctl-{os.getpid()}"
    method, args = build_call(ns, dbg)
    sr_type = getattr(ns, "type", None)
    if sr_type is not None and not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", sr_type):
        parser.error(f"{sr_type!r} is not an SR type (lower-case letters, digits, _)")
    try:
        target = Target(ns)
        if method in ("VDI.snapshot", "VDI.clone"):
            base = target.call(
                "VDI.stat",
                {"dbg": dbg, "sr": args["sr"], "vdi": args["vdi_info"]["vdi"]},
                sr_type,
            )
            if base.status == "Success" and isinstance(base.value.get("Value"), dict):
                args["vdi_info"] = dict(base.value["Value"], **args["vdi_info"])
        if ns.command in LONG_COMMANDS and not ns.json and sys.stderr.isatty():
            with ProgressBar(dbg, target.status, sys.stderr):
                resp = target.call(method, args, sr_type)
        else:
            resp = target.call(method, args, sr_type)
        if resp.status == "Success" and ns.command == "sr-create" and not ns.no_attach:
            attach = {
                "dbg": dbg,
                "sr": args["sr"],
                "device_config": args["device_config"],
            }
            then = target.call("SR.attach", attach, sr_type)
            if then.status != "Success":
                print(
                    f"smctl: created SR {args['sr']}, but attaching it failed:",
                    file=sys.stderr,
                )
                resp = then
    except client.ConnectError as e:
        print(f"smctl: error: {e}", file=sys.stderr)
        if not ns.direct:
            print(
                "  is sm-dispatcher running? (or use --socket, --url, --direct)",
                file=sys.stderr,
            )
        return EXIT_CONNECT
    except wire.WireError as e:
        print(
            f"smctl: error: bad answer from {'the plugin' if ns.direct else 'the dispatcher'}: {e}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return report(ns, method, args, resp)


def report(
    ns: argparse.Namespace, method: str, args: dict[str, Any], resp: wire.Response
) -> int:
    if resp.fault is not None:
        code, text = resp.fault
        if ns.json:
            print(json.dumps({"faultCode": code, "faultString": text}))
        print(f"smctl: error: {method}: XML-RPC fault {code}: {text}", file=sys.stderr)
        return EXIT_FAILURE
    if resp.status != "Success":
        err = resp.error
        if ns.json:
            print(json.dumps({"Status": "Failure", "ErrorDescription": err}))
        line, detail = explain(err)
        print(f"smctl: error: {method}: {line}", file=sys.stderr)
        for d in detail:
            for text in d.splitlines():
                print(f"  {text}", file=sys.stderr)
        return EXIT_FAILURE
    value = resp.value.get("Value")
    if ns.command == "sr-create":
        value = args["sr"]
    if ns.json:
        print(json.dumps(value, indent=1, sort_keys=True, default=str))
    elif ns.quiet:
        for item in value if isinstance(value, list) else [value]:
            key = item.get("vdi", "") if isinstance(item, dict) else item
            if key not in (None, ""):
                print(key)
    else:
        text = show(ns.command, value)
        if text:
            print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
