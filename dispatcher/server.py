"""The ``sm-dispatcher`` daemon: start, stop, listeners, the embedded default SR.

Owns the daemon's life cycle; the HTTP layer is ``dispatcher.httpd``, its
bounds ``dispatcher.frontend``, the command line ``dispatcher.options``,
routing and plugin processes ``dispatcher.core``.

- Listens on ``<run_dir>/sm-dispatcher.sock`` by default (``--socket``; mode
  0600, or 0660 for ``--socket-group``), and on TCP when asked (``--tcp
  [HOST:]PORT``; HOST defaults to 127.0.0.1).  TCP is mutual TLS only: the
  host's certificate, key and CA and the client names to let in come from
  ``<etc_dir>/pool.json`` (``smcommon.pool``) or ``--tls-cert``,
  ``--tls-key``, ``--tls-ca``, ``--allow-client``; without them the daemon
  refuses to start, unless ``--insecure``, which serves plain HTTP on a
  loopback address only and says so in the log and the banner.
- Request limits: a body must have a Content-Length no larger than
  ``--max-body`` (beyond: XML-RPC fault -32702, connection closed); a body
  with a DTD gets fault -32701; deadlines, connection and memory bounds:
  ``dispatcher.frontend``.
- Files: the daemon's umask is 077: what it creates (state, log, spool) is
  root's alone.
- SIGTERM/SIGINT: stop accepting, let in-flight calls finish within
  ``--stop-timeout``, then cancel the rest (SIGTERM, SIGKILL after
  ``--cancel-grace``), remove socket and pid file, exit 0.
- One log line per call (logger ``dispatcher.calls``):
  ``dbg=... method=... sr=... plugin=... duration=...s outcome=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socketserver
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smcommon.engine.remote import import_dir
from smcommon.errors import Error
from smcommon.fileio import private_dir
from smcommon.paths import Paths
from smcommon.pool import PoolConfig, is_loopback

from dispatcher import client, options, upload, wire
from dispatcher.core import Config, Dispatcher
from dispatcher.frontend import BodyBudget, Frontend, Limits
from dispatcher.httpd import TcpServer, bind_tcp, bind_unix
from dispatcher.outcomes import OutcomeStore
from dispatcher.routes import RouteTable

log = logging.getLogger("dispatcher")
call_log = logging.getLogger("dispatcher.calls")

REPO_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
PLUGINS_ENV = "SM_PLUGINS_DIR"
DEFAULT_SR_NAMESPACE = uuid.UUID("6f1d3a52-6a4b-4c69-9a3e-2f1f6f0c7d11")
DEFAULT_SR_TYPE = "ext"


def default_plugins_dir() -> Path:
    return Path(os.environ.get(PLUGINS_ENV) or REPO_PLUGINS)


def _clean_progress(directory: Path | None) -> None:
    """A fresh progress directory (what an earlier run left is stale)."""
    if directory is None:
        return
    private_dir(directory)
    for f in directory.iterdir():
        with contextlib.suppress(OSError):
            f.unlink()


# -- the embedded default SR ----------------------------------------------------


def ensure_default_sr(
    dispatcher: Dispatcher, directory: Path, sr_uuid: str | None
) -> str:
    """Create (first time) or attach the ext SR on ``directory``; its uuid."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    known = dispatcher.routes.default_for(str(directory))
    sr = known or sr_uuid or str(uuid.uuid5(DEFAULT_SR_NAMESPACE, str(directory)))
    dc = {"path": str(directory)}
    dbg = f"sm-dispatcher-default-sr-{os.getpid()}"
    problems = []
    if not known:
        # a failed create is not fatal: the SR may exist from an earlier table
        err = _call_ext(
            dispatcher,
            "SR.create",
            {"dbg": dbg, "sr": sr, "device_config": dc, "physical_size": 0},
        )
        if err:
            problems.append(f"SR.create: {' '.join(err)}")
    err = _call_ext(
        dispatcher, "SR.attach", {"dbg": dbg, "sr": sr, "device_config": dc}
    )
    if err and err[0] != "Sr_attached":
        problems.append(f"SR.attach: {' '.join(err)}")
        raise SystemExit(
            f"sm-dispatcher: cannot set up the default SR on {directory}: {'; '.join(problems)}"
        )
    dispatcher.routes.set_default(str(directory), sr, DEFAULT_SR_TYPE)
    return sr


def _call_ext(dispatcher: Dispatcher, method: str, args: dict[str, Any]) -> list[str]:
    """Call the ext plugin through the dispatcher; the ErrorDescription, [] if fine."""
    out, _fields = dispatcher.handle(DEFAULT_SR_TYPE, wire.dumps_call(method, args))
    resp = wire.parse_response(out)
    if resp.status == "Success":
        return []
    return resp.error or [f"fault {resp.fault}"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return options.parse_args(argv, default_plugins_dir())


def tls_setup(
    args: argparse.Namespace, paths: Paths
) -> tuple[ssl.SSLContext | None, list[str]]:
    """The TCP listener's TLS context and allowed client names; SystemExit
    when --tcp lacks them (or --insecure names a non-loopback address)."""
    if args.insecure:
        if not is_loopback(args.tcp_host):
            raise SystemExit(
                f"sm-dispatcher: --insecure serves plain HTTP with no authentication: "
                f"it binds only to a loopback address, not {args.tcp_host}"
            )
        log.warning(
            "INSECURE: TCP %s:%d is plain HTTP with no client authentication (--insecure)",
            args.tcp_host, args.tcp_port,
        )  # fmt: skip
        return None, []
    try:
        pool = PoolConfig.load(paths, args.pool_config)
    except Error as e:
        raise SystemExit(f"sm-dispatcher: {e}") from None
    pool.cert = args.tls_cert or pool.cert
    pool.key = args.tls_key or pool.key
    pool.ca = args.tls_ca or pool.ca
    allow = list(args.allow_client or pool.allow)
    if not pool.has_identity() or not allow:
        raise SystemExit(
            "sm-dispatcher: --tcp serves mutual TLS only: it needs this host's certificate, "
            "key and CA and the client names to let in (pool.json in "
            f"{paths.etc_dir}, or --tls-cert, --tls-key, --tls-ca and --allow-client); "
            "--insecure serves plain HTTP on loopback, for tests"
        )
    try:
        return pool.server_context(), allow
    except Error as e:
        raise SystemExit(f"sm-dispatcher: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.umask(0o077)  # state, log, spool: root's alone
    options.setup_logging(args)
    paths = Paths.from_env()
    tls, allow = tls_setup(args, paths) if args.tcp else (None, [])
    plugins_dir = (args.plugins_dir or default_plugins_dir()).resolve()
    instance = uuid.uuid4().hex[:12]
    config = Config(
        plugins_dir=plugins_dir,
        timeout=args.timeout,
        workers=args.workers,
        queue_timeout=args.queue_timeout,
        max_body=args.max_body,
        cancel_grace=args.cancel_grace,
        env=dict(os.environ),
        import_dir=import_dir(paths),
        share=args.share,
        short_timeout=args.short_timeout,
        min_rate=args.min_rate,
        stall_timeout=args.stall_timeout,
        progress_dir=paths.run_dir / "progress",
        max_spool=args.max_spool,
        spool_reserve=args.spool_reserve,
        warm=not args.no_warm,
        warm_max_calls=args.warm_max_calls,
    )
    try:
        outcomes = OutcomeStore(
            paths.state_dir / "dispatcher" / "outcomes",
            instance,
            ttl=args.outcome_ttl,
            max_records=args.max_outcomes,
        )
        outcomes.prune()
        _clean_progress(config.progress_dir)
    except OSError as e:
        raise SystemExit(f"sm-dispatcher: cannot set up its state: {e}") from None
    dispatcher = Dispatcher(
        config, RouteTable.for_host(paths), outcomes, instance=instance
    )
    dispatcher.spool = upload.Spool(
        import_dir(paths), config.max_spool, config.spool_reserve
    )
    dispatcher.spool.clean()
    unclaimed = outcomes.unclaimed()
    if unclaimed:
        log.info(
            "%d unclaimed outcome(s) of calls whose reply was lost: a retry of the "
            "same call gets it (Dispatcher.status lists them)",
            len(unclaimed),
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    servers: list[socketserver.BaseServer] = []
    sock_path = (
        None if args.no_socket else (args.socket or client.default_socket(paths))
    )
    budget = BodyBudget(args.max_inflight, args.max_body)
    limits = Limits(
        request_timeout=args.request_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_reading=args.max_reading,
        max_per_client=args.max_per_client,
    )
    try:
        if sock_path is not None:
            # the Unix socket is root's (or one group's): no per-client bound,
            # and its own connections, which nothing on TCP can take
            fe = Frontend(Limits(**{**limits.__dict__, "max_per_client": None}), budget)
            servers.append(bind_unix(sock_path, dispatcher, fe, args.socket_group))
        if args.tcp:
            servers.append(
                bind_tcp(
                    args.tcp_host, args.tcp_port, dispatcher, Frontend(limits, budget), tls, allow
                )
            )
    except OSError as e:
        for srv in servers:
            srv.server_close()
        raise SystemExit(f"sm-dispatcher: cannot listen: {e}") from None
    pid_file = args.pid_file or paths.run_dir / "sm-dispatcher.pid"
    private_dir(pid_file.parent)
    pid_file.write_text(f"{os.getpid()}\n")
    threads = [
        threading.Thread(
            target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        for s in servers
    ]
    for t in threads:
        t.start()
    try:
        dispatcher.prewarm()
        default_sr = None
        if args.default_sr is not None:
            default_sr = ensure_default_sr(
                dispatcher, args.default_sr, args.default_sr_uuid
            )
        _announce(dispatcher, sock_path, servers, default_sr, args)
        while not stop.wait(3600):
            pass
        log.info(
            "stopping: no new connections; waiting up to %gs for %d call(s)",
            args.stop_timeout,
            len(dispatcher.running()),
        )
    finally:
        # Stopping already: a repeated SIGTERM/SIGINT must not kill us half-way,
        # nor during interpreter finalization (which restores SIG_DFL).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for srv in servers:
            srv.shutdown()
            srv.server_close()
            srv.frontend.stop()  # type: ignore[attr-defined]
        if sock_path is not None:
            try:
                sock_path.unlink()
            except FileNotFoundError:
                pass
        dispatcher.stopping = True
        if not dispatcher.wait_idle(args.stop_timeout):
            n = dispatcher.cancel_all("stop")
            log.warning("stopping: cancelling %d call(s) still running", n)
            dispatcher.wait_idle(args.cancel_grace + 5)
        if dispatcher.warm is not None:
            dispatcher.warm.close()
        try:
            pid_file.unlink()
        except FileNotFoundError:
            pass
    # let handler threads write the last responses (bounded)
    deadline = time.monotonic() + 2
    while any(srv.in_flight() for srv in servers) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    log.info("stopped")
    return 0


def _smctl_command() -> str:
    """How a person types smctl here: ``smctl`` if PATH finds this one, else its path."""
    mine = Path(sys.executable).parent / "smctl"
    found = shutil.which("smctl")
    if found and os.path.realpath(found) == os.path.realpath(mine):
        return "smctl"
    try:
        return os.path.relpath(mine) if mine.resolve().is_relative_to(Path.cwd()) else str(mine)
    except (OSError, ValueError):
        return str(mine)


def _announce(
    dispatcher: Dispatcher,
    sock_path: Path | None,
    servers: list[socketserver.BaseServer],
    default_sr: str | None,
    args: argparse.Namespace,
) -> None:
    plugins = dispatcher.plugin_types()
    smctl = _smctl_command()
    lines = [f"sm-dispatcher ready (pid {os.getpid()})"]
    lines.append(
        f"  plugins: {', '.join(plugins) or 'none'} (from {dispatcher.config.plugins_dir})"
    )
    lines.append(
        "  plugin processes: "
        + ("forked from warm parents (--no-warm: executed)" if dispatcher.warm else "executed (--no-warm)")
    )
    address = ""
    if sock_path is not None:
        lines.append(f"  unix socket: {sock_path}")
        address = f"--socket {sock_path}"
    for srv in servers:
        if isinstance(srv, TcpServer):
            host, port = srv.server_address[0], srv.server_address[1]
            host = host.decode() if isinstance(host, bytes) else host
            host = f"[{host}]" if ":" in host else host
            if srv.ssl_context is None:
                url = f"http://{host}:{port}/"
                lines.append(
                    f"  tcp: {url} INSECURE: plain HTTP, no client authentication "
                    "(--insecure, loopback only)"
                )
            else:
                url = f"https://{host}:{port}/"
                lines.append(
                    f"  tcp: {url} (mutual TLS; clients: {', '.join(sorted(srv.allow))})"
                )
            if not address:
                address = f"--url {url}"
    if default_sr:
        lines.append(f"  default SR: {default_sr} (ext on {args.default_sr.resolve()})")
        lines.append(
            f"  try: {smctl} {address} vdi-create {default_sr} --name d0 --size 10M"
        )
        lines.append(f"       {smctl} {address} vdi-list {default_sr}")
    else:
        lines.append(f"  try: {smctl} {address} sr-ls")
    target = (
        repr(str(sock_path)) if sock_path is not None else repr(address.split()[-1])
    )
    lines.append(
        f"  python: import dispatcher.client as c; c.connect({target}).SR.ls({{'dbg': 'me'}})"
    )
    print("\n".join(lines), flush=True)
    log.info("listening: %s", "; ".join(lines[1:]))


if __name__ == "__main__":
    sys.exit(main())
