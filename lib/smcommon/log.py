"""Logging of a plugin call: where lines go and what every line carries.

This module owns the logging set-up of a plugin process (``setup``): every
record of every logger goes to the log file (``Paths.log_file``, directories
created), tagged with the program name, pid and the call's ``dbg``; ``-v``
also sends them to stderr.  If the log file cannot be opened the records go to
syslog (``/dev/log``) instead, or nowhere: logging never fails a call.  Nothing
is ever logged to stdout (stdout carries the response).  The values of the
call's secrets (``CallContext.secrets``: its device_config's secret keys, set
by ``smcommon.plugin``) are masked in every record, traceback included.
"""

from __future__ import annotations

import logging
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

FORMAT = (
    "%(asctime)s %(prog)s[%(process)d] %(levelname)s [%(dbg)s] %(name)s: %(message)s"
)
SYSLOG_FORMAT = "%(prog)s[%(process)d]: %(levelname)s [%(dbg)s] %(name)s: %(message)s"
# one for every call (a Formatter holds no state of its own between records):
# made once, by the warm parent too, not again in every call's process
_FORMATTER = logging.Formatter(FORMAT)


MASK = "******"


def mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class CallContext(logging.Filter):
    """Adds ``prog`` and ``dbg`` to every record that reaches a handler, and
    masks ``secrets`` in it."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog
        self.dbg = "-"
        self.secrets: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        record.prog = self.prog
        record.dbg = self.dbg
        if self.secrets:
            record.msg = mask(record.getMessage(), self.secrets)
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = mask(record.exc_text, self.secrets)
            if record.stack_info:
                record.stack_info = mask(record.stack_info, self.secrets)
        return True


def setup(
    log_file: str | os.PathLike[str] | None,
    prog: str,
    *,
    verbose: bool = False,
    stream: TextIO | None = None,
) -> CallContext:
    """Send every log record to ``log_file`` (else syslog), and stderr if verbose.

    ``stream`` replaces stderr.  Returns the filter whose ``dbg`` attribute the caller sets once it knows it.
    """
    context = CallContext(prog)
    # a full disk must neither print tracebacks nor fail the call
    logging.raiseExceptions = False
    shutdown()
    root = logging.getLogger()
    if root.level != logging.DEBUG:  # setLevel clears every logger's cache, each call
        root.setLevel(logging.DEBUG)
    handler = _file_handler(log_file) if log_file is not None else None
    if handler is None:
        handler = _syslog_handler()
    if handler is not None:
        _install(handler, context)
    if verbose:
        to_stderr = logging.StreamHandler(stream or sys.stderr)
        to_stderr.setFormatter(_FORMATTER)
        _install(to_stderr, context)
    return context


def shutdown() -> None:
    """Remove and close the handlers ``setup`` installed (and only those)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "smcommon_call", False):
            root.removeHandler(h)
            h.close()


def _install(handler: logging.Handler, context: CallContext) -> None:
    handler.smcommon_call = True  # type: ignore[attr-defined]
    handler.addFilter(context)
    logging.getLogger().addHandler(handler)


class LineFile(logging.Handler):
    """Each record, formatted, appended to a file in one ``write`` (O_APPEND):
    the bytes of ``logging.FileHandler(encoding="utf-8",
    errors="backslashreplace")``, without its three stream objects, a flush
    per record and a ``makedirs`` per call (with the shared formatter and
    the root level set once: ~50 fewer page copies in a warm call)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:  # the first call: make its directories
            os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
            fd = os.open(path, flags, 0o666)
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            os.write(self.fd, line.encode("utf-8", "backslashreplace"))
        except Exception:  # noqa: BLE001 -- as logging does: never fail the call
            self.handleError(record)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        super().close()


def _file_handler(log_file: str | os.PathLike[str]) -> logging.Handler | None:
    try:
        handler = LineFile(log_file)
    except (OSError, ValueError):
        return None
    handler.setFormatter(_FORMATTER)
    return handler


def _syslog_handler() -> logging.Handler | None:
    if not os.path.exists("/dev/log"):
        return None
    try:
        import logging.handlers

        handler = logging.handlers.SysLogHandler(address="/dev/log")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return handler
