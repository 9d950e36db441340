"""The ``sm-dispatcher`` command line and the daemon's logging set-up."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

PLUGINS_ENV = "SM_PLUGINS_DIR"


def parse_args(argv: Sequence[str] | None, plugins_default: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sm-dispatcher",
        description="The storage manager's dispatcher: XML-RPC over HTTP on a Unix socket "
        "(and TCP), one plugin process per call.",
        epilog="Extra methods: Dispatcher.cancel({dbg, task}) cancels the running call whose dbg is "
        "task; Dispatcher.status({dbg}) lists plugins, known SRs and running calls. "
        "Host paths derive from $SM_ROOT.",
    )
    p.add_argument(
        "--plugins-dir",
        type=Path,
        default=None,
        help=f"where <TYPE>SR executables live (default ${PLUGINS_ENV}, else {plugins_default})",
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="Unix socket (default <run_dir>/sm-dispatcher.sock)",
    )
    p.add_argument(
        "--no-socket", action="store_true", help="do not listen on a Unix socket"
    )
    p.add_argument(
        "--tcp",
        metavar="[HOST:]PORT",
        help="also listen on TCP (HOST default 127.0.0.1): mutual TLS only, see --tls-*",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve --tcp as plain HTTP with no client authentication: loopback "
        "addresses only, for tests and benchmarks",
    )
    p.add_argument(
        "--pool-config",
        type=Path,
        default=None,
        help="this host's TLS identity, allowed clients and peers "
        "(default <etc_dir>/pool.json, i.e. /etc/sm/pool.json)",
    )
    p.add_argument("--tls-cert", help="this host's certificate (PEM) for --tcp")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--tls-ca", help="the CA every client certificate must be signed by (PEM)")
    p.add_argument(
        "--allow-client",
        action="append",
        metavar="NAME",
        help="a client certificate name (DNS subjectAltName or CN) let in over --tcp "
        "(repeatable; default: pool.json's allow)",
    )
    p.add_argument(
        "--socket-group",
        help="let this group use the Unix socket (mode 0660; default: root only, 0600)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=20.0,
        help="a whole request (line, headers, body) must arrive within this, seconds (20)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="a connection waiting for a request is closed after this, seconds (30)",
    )
    p.add_argument(
        "--max-reading",
        type=int,
        default=128,
        help="connections reading a request at once; beyond, the slowest goes (128)",
    )
    p.add_argument(
        "--max-per-client",
        type=int,
        default=64,
        help="TCP connections one client address may hold (64)",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=64 << 20,
        help="bytes of request bodies held in memory by all connections together (64 MiB)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="plugin timeout of most methods, seconds (300); short ones get at most "
        "--short-timeout, long ones (copy, import, coalesce) more: see --min-rate",
    )
    p.add_argument(
        "--short-timeout",
        type=float,
        default=60.0,
        help="timeout of read-only methods (Query.*, SR.ls/scan, VDI.stat ...), seconds (60)",
    )
    p.add_argument(
        "--min-rate",
        type=float,
        default=50e6,
        help="long methods get --timeout plus their disk's size at this rate, bytes/s (50e6)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=600.0,
        help="a long method whose progress stands still this long is killed, seconds (600)",
    )
    p.add_argument(
        "--workers", type=int, default=16, help="plugin processes at once (16)"
    )
    p.add_argument(
        "--no-warm",
        action="store_true",
        help="execute every plugin process (default: fork them from a warm parent per plugin)",
    )
    p.add_argument(
        "--warm-max-calls",
        type=int,
        default=1000,
        help="calls a warm parent forks before it is replaced (1000)",
    )
    p.add_argument(
        "--share",
        type=int,
        default=None,
        help="plugin processes one SR may hold at once (default: all but a quarter)",
    )
    p.add_argument(
        "--max-spool",
        type=int,
        default=4 << 40,
        help="bytes uploads may hold in the spool at once (4 TiB)",
    )
    p.add_argument(
        "--spool-reserve",
        type=int,
        default=1 << 30,
        help="bytes the spool's filesystem keeps free (1 GiB)",
    )
    p.add_argument(
        "--outcome-ttl",
        type=float,
        default=24 * 3600.0,
        help="seconds an unclaimed outcome is kept for a retry (86400)",
    )
    p.add_argument(
        "--max-outcomes",
        type=int,
        default=1000,
        help="unclaimed outcomes kept at most (1000)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="how long a call waits for a slot (60)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=4 * 1024 * 1024,
        help="request body limit, bytes (4 MiB)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="connections served at once (512)",
    )
    p.add_argument(
        "--cancel-grace",
        type=float,
        default=5.0,
        help="SIGTERM to SIGKILL on cancel, seconds (5)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="in-flight bound on SIGTERM, seconds (30)",
    )
    p.add_argument(
        "--default-sr",
        type=Path,
        metavar="DIR",
        help="attach (create once) an ext SR on DIR",
    )
    p.add_argument(
        "--default-sr-uuid", help="uuid of the default SR when it is first created"
    )
    p.add_argument(
        "--pid-file",
        type=Path,
        default=None,
        help="default <run_dir>/sm-dispatcher.pid",
    )
    p.add_argument(
        "--log-file", type=Path, default=None, help="log here instead of stderr"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.no_socket and not args.tcp:
        p.error("--no-socket needs --tcp: the dispatcher must listen somewhere")
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not port.isdigit() or not 0 <= int(port) < 65536:
            p.error(f"--tcp {args.tcp!r}: expected [HOST:]PORT")
        args.tcp_host, args.tcp_port = host.strip("[]") or "127.0.0.1", int(port)
    elif args.insecure:
        p.error("--insecure applies to --tcp only")
    for name in (
        "timeout", "queue_timeout", "cancel_grace", "stop_timeout", "short_timeout",
        "min_rate", "stall_timeout", "outcome_ttl", "request_timeout", "idle_timeout",
    ):  # fmt: skip
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 1 or args.max_body < 1 or args.max_connections < 1:
        p.error("--workers, --max-body and --max-connections must be at least 1")
    if args.max_per_client < 1 or args.max_reading < 1:
        p.error("--max-per-client and --max-reading must be at least 1")
    if args.max_inflight < args.max_body:
        p.error("--max-inflight must be at least --max-body")
    return args


def setup_logging(args: argparse.Namespace) -> None:
    handler: logging.Handler
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(args.log_file)  # 0600: the daemon's umask
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s sm-dispatcher[%(process)d] %(levelname)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
