"""The entry point of every SR plugin executable: one request in, one response out.

This module owns the per-call process of a plugin (docs/design.md, "The wire
runtime").  ``main(driver_factory)`` is the whole body of an executable such
as ``plugins/ext/EXTSR``:

- With no argument it reads one XML-RPC methodCall from stdin (bounded in size
  and in time); with an XML argument it reads that.  It validates the request
  against ``smcommon.api``, calls ``driver.<method>`` (``"VDI.create"`` ->
  ``driver.vdi_create(dbg=..., sr=..., vdi_info=...)``), writes one
  methodResponse to stdout and exits 0, whatever happened.  Malformed input
  gets a well-formed Failure naming the problem (``Backend_error
  INVALID_REQUEST`` / ``UNKNOWN_METHOD``); a method the driver lacks answers
  ``Unimplemented``; an ``smcommon.errors.Error`` from the driver is answered
  with its ErrorDescription and logged at INFO; anything else is a bug, logged
  at ERROR with its traceback and answered ``Backend_error INTERNAL_ERROR``.
  While the driver runs, stdout (fd 1) points at stderr, so a stray print or
  a child process cannot corrupt the response.
- For people: ``--help`` (``METHOD --help`` for one method); the by-hand form
  ``EXTSR VDI.create sr=<uuid> vdi_info='{"name_label": "d0", "virtual_size":
  "10G"}'`` (values typed by the method's inputs: strings as given, int64 as
  integers or sizes (``10G``, see ``smcommon.sizes``), bools, JSON for structs; ``dbg`` defaults to
  ``cli-<pid>``) prints the Value as pretty JSON, or one error line on stderr
  and exit code 1 (2 when the command line is not a valid request: the one
  rule for every kind of request problem); ``--json`` prints the whole response struct as JSON,
  ``--xml`` the methodResponse; ``-v`` logs to stderr; ``--root DIR`` sets
  ``$SM_ROOT`` for the call.
- Every call is logged (dbg, method, sr, duration, outcome) to
  ``Paths.log_file`` (see ``smcommon.log``).

The toolstack pays a process start per call, so this module imports only
what every call needs; the driver factory should import its engine lazily too.
"""

from __future__ import annotations

import io
import os
import sys
import time

from smcommon import api, rpc
from smcommon.errors import Error, InvalidRequest, Unimplemented, to_wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Iterator
    from typing import BinaryIO, NoReturn, TextIO

    from smcommon.log import CallContext
    from smcommon.paths import Paths

    DriverFactory = Callable[[Paths], object]

# What every call imports, done once by a warm parent (dispatcher/zygote.py)
WARM_IMPORTS = [
    "smcommon.log",
    "smcommon.paths",
    "select",
    "json",
    "xml.parsers.expat",
    "encodings.utf_16_be",
    "encodings.utf_16_le",
]
# The call a warm parent runs through a plugin on this runtime before its first
# fork (dispatcher/zygote.py, rehearse): Query.query needs no SR, lock or
# device, and its one log line names itself by its dbg.
WARM_REHEARSAL = (
    b"<?xml version='1.0'?><methodCall><methodName>Query.query</methodName><params>"
    b"<param><value><struct><member><name>dbg</name><value><string>warm parent rehearsal"
    b"</string></value></member></struct></value></param></params></methodCall>"
)
STDIN_TIMEOUT_ENV = "SM_STDIN_TIMEOUT"
OUTCOME_ENV = "SM_OUTCOME_FILE"  # set by the dispatcher: where to keep the response
STDIN_TIMEOUT = 60.0  # seconds to wait for a complete request on stdin
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
STREAM_ITEMS = 2000  # a list answer longer than this is written as it is marshalled
PIPE_SIZE = 1 << 20  # and through a pipe this large (its pieces are smaller)


class Outcome:
    """What a call produced: a Value, or an ErrorDescription."""

    __slots__ = ("_body", "error", "method", "value")

    def __init__(
        self,
        method: api.Method | None,
        value: object = None,
        error: list[str] | None = None,
    ) -> None:
        self.method = method
        self.value = value
        self.error = error
        self._body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def response(self) -> bytes:
        """The methodResponse, marshalled once (an SR.scan answer is megabytes)
        and checked against the method's output type as it is: a value that
        is not one is the driver's bug, a BackendError INTERNAL_ERROR."""
        if self._body is None:
            if self.error is not None:
                self._body = rpc.failure(self.error)
            elif self.method is None:
                self._body = rpc.success(self.value)
            else:
                try:
                    self._body = rpc.success(self.value, self.method.output)
                except InvalidRequest:
                    self.method.check_result(self.value)  # raises, saying where
                    raise
        return self._body

    def streams(self) -> bool:
        """A list answer of more than STREAM_ITEMS items: written piece by
        piece as it is marshalled (``pieces``), not marshalled first."""
        return (
            self.error is None
            and self._body is None
            and self.method is not None
            and self.method.output.kind == "list"
            and isinstance(self.value, list)
            and len(self.value) > STREAM_ITEMS
        )

    def pieces(self) -> Iterator[bytes]:
        """The methodResponse in pieces (InvalidRequest from the piece with
        an item not of the output type)."""
        if not self.streams():
            yield self.response()
            return
        assert self.method is not None
        try:
            yield from rpc.success_pieces(self.value, self.method.output)  # type: ignore[arg-type]
        except InvalidRequest:
            self.method.check_result(self.value)  # raises, saying where
            raise

    def checked(self) -> object:
        """The value as the method's output type has it (defaults filled in)."""
        return self.value if self.method is None else self.method.check_result(self.value)

    def as_struct(self) -> dict[str, object]:
        if self.error is not None:
            return {"Status": "Failure", "ErrorDescription": self.error}
        return {"Status": "Success", "Value": self.checked()}


class Call:
    """One plugin process's call: lazy driver, dispatch, logging."""

    def __init__(
        self, driver_factory: DriverFactory, prog: str, context: CallContext | None
    ) -> None:
        self.driver_factory = driver_factory
        self.prog = prog
        self.context = context
        self._driver: object | None = None
        self.secrets: list[str] = []

    @property
    def log(self) -> logging.Logger:
        import logging

        return logging.getLogger("smcommon.plugin")

    def driver(self) -> object:
        if self._driver is None:
            from smcommon.paths import Paths

            self._driver = self.driver_factory(Paths.from_env())
        return self._driver

    def _secrets(self, device_config: object) -> list[str]:
        """The values of ``device_config``'s secret keys, which the driver
        declares (``secret_keys``); every value of length 4 or more when it
        declares nothing.  Masked in this call's log records and errors."""
        if not isinstance(device_config, dict):
            return []
        declared = getattr(self.driver(), "secret_keys", None)
        if declared is None:
            found = [v for v in device_config.values() if isinstance(v, str) and len(v) >= 4]
        else:
            found = [device_config[k] for k in declared if isinstance(device_config.get(k), str)]
        found = sorted({v for v in found if v}, key=len, reverse=True)
        if self.context is not None:
            self.context.secrets = found
        return found

    def _masked(self, error: list[str]) -> list[str]:
        if not self.secrets:
            return error
        from smcommon.log import mask

        return [mask(e, self.secrets) for e in error]

    def extra_methods(self) -> list[api.Method]:
        return list(getattr(self.driver(), "extra_methods", None) or ())

    def method(self, name: str) -> api.Method:
        found = api.METHODS.get(name)
        if found is not None:
            return found
        return api.lookup(name, self.extra_methods())

    def dispatch(
        self, name: str | None, params: list[object], started: float | None = None
    ) -> Outcome:
        """Validate and run one call; never raises."""
        started = time.monotonic() if started is None else started
        first = params[0] if len(params) == 1 and isinstance(params[0], dict) else {}
        dbg, sr = first.get("dbg"), first.get("sr")
        if self.context is not None and isinstance(dbg, str):
            self.context.dbg = self._clean(dbg)
        method: api.Method | None = None
        try:
            if name is None:
                raise InvalidRequest("no method")
            method = self.method(name)
            if len(params) != 1:
                raise InvalidRequest(
                    f"{name} takes exactly one struct argument holding its named inputs, "
                    f"not {len(params)} parameters"
                )
            kwargs = method.validate(params[0])
            self.secrets = self._secrets(kwargs.get("device_config"))
            fn = getattr(self.driver(), method.attr, None)
            if fn is None:
                raise Unimplemented(name)
            result = fn(**kwargs)
            outcome = Outcome(method, result)
            if not outcome.streams():
                outcome.response()  # a result not of the output type is a bug, answered as one
        except Error as e:
            outcome = Outcome(method, error=self._masked(to_wire(e)))
            self._log_call(
                name, sr, started, f"failed: {' '.join(outcome.error or ())}"
            )
            return outcome
        except BaseException as e:
            # a bug: the traceback goes to the log, the answer is INTERNAL_ERROR
            outcome = Outcome(method, error=self._masked(to_wire(e)))
            self.log.exception("%s: internal error", name)
            self._log_call(
                name, sr, started, f"failed: {' '.join(outcome.error or ())}"
            )
            return outcome
        self._log_call(name, sr, started, "ok")
        return outcome

    @staticmethod
    def _clean(text: str, limit: int = 200) -> str:
        """``text`` safe for one log line: no control characters, bounded."""
        if not text.isprintable():
            text = text.encode("unicode_escape").decode("ascii")
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _log_call(
        self, name: str | None, sr: object, started: float, outcome: str
    ) -> None:
        took = time.monotonic() - started
        where = f" sr={self._clean(sr)}" if isinstance(sr, str) and sr else ""
        text = self._clean(outcome, 2000)
        self.log.info("%s%s: %s in %.3fs", self._clean(name or "?"), where, text, took)


# --- reading the request ----------------------------------------------------------


def read_request(stream: BinaryIO, timeout: float | None = None) -> bytes:
    """At most rpc.MAX_REQUEST bytes from ``stream`` until EOF, within ``timeout``."""
    if timeout is None:
        try:
            timeout = float(os.environ.get(STDIN_TIMEOUT_ENV) or STDIN_TIMEOUT)
        except ValueError:
            timeout = STDIN_TIMEOUT
    limit = rpc.MAX_REQUEST
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise InvalidRequest(f"the request is larger than {limit} bytes") from None
        return data
    import select

    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    total = 0
    while True:
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            raise InvalidRequest(
                f"no complete request on stdin within {timeout:g}s (stdin was not closed)"
            )
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise InvalidRequest(f"the request is larger than {limit} bytes")
        chunks.append(chunk)


# --- the by-hand form ----------------------------------------------------------


def _typed_value(type: api.Type, text: str, name: str = "") -> object:
    """A by-hand argument's value, read according to the input's type."""
    kind = type.kind
    if kind in ("string", "key"):
        return text
    if kind == "int64":
        return _size(text, name)
    if kind == "bool":
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        return text
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        if kind in ("struct", "map", "list"):
            raise InvalidRequest(
                f"{name}={text[:60]!r} is not JSON ({e}); give a {type.name}"
            ) from None
        return text
    return _sizes_in(type, value, name)


def _size(text: str, name: str) -> int:
    """An int64 typed by a person: an integer or a size (``10G``)."""
    from smcommon import sizes

    t = text.strip()
    if t[:1] == "-" and t[1:].isascii() and t[1:].isdigit():
        return int(t)
    return sizes.parse(t, name)


def _sizes_in(type: api.Type, value: object, name: str) -> object:
    """Read sizes (``"10G"``) in the int64 fields of a struct given as JSON."""
    if type.kind == "struct" and isinstance(value, dict):
        for key, f in type.fields.items():
            v = value.get(key)
            if f.type.kind == "int64" and isinstance(v, str):
                value[key] = _size(v, f"{name}.{key}")
    elif type.kind == "list" and isinstance(value, list) and type.item is not None:
        return [_sizes_in(type.item, v, name) for v in value]
    return value


def by_hand_params(method: api.Method, args: list[str]) -> dict[str, object]:
    """The struct argument built from ``key=value`` words."""
    params: dict[str, object] = {}
    for word in args:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise InvalidRequest(
                f"by-hand arguments are key=value, not {word!r} (see {method.name} --help)"
            )
        if key in params:
            raise InvalidRequest(f"{method.name}: argument {key!r} given twice")
        arg = method.inputs.get(key)
        if arg is not None:
            params[key] = _typed_value(arg.type, text, key)
        else:
            # not an input: validation refuses it, naming it
            params[key] = _typed_value(api.ANY, text)
    params.setdefault("dbg", f"cli-{os.getpid()}")
    return params


# --- help ------------------------------------------------------------------------


def usage(prog: str) -> str:
    return (
        f"usage: {prog} [-v] < request.xml           one XML-RPC methodCall on stdin\n"
        f"       {prog} [-v] '<methodCall>...'       the request as the first argument\n"
        f"       {prog} [-v] [--json|--xml] METHOD key=value ...   a call by hand\n"
        f"       {prog} --help | METHOD --help\n"
        f"options: -v log to stderr; --json print the whole response as JSON; --xml print\n"
        f"         the methodResponse; --root DIR every host path under DIR ($SM_ROOT)\n"
        f"by hand, int64 values take sizes: 512M, 10G, 1.5T (powers of 1024); structs are JSON\n"
        f"exit codes: an XML-RPC request always exits 0 (the response says how it went);\n"
        f"         by hand: 0 success, 1 the call failed (an SMAPI error), 2 the command line\n"
        f"         is not a valid request (unknown method, bad JSON, missing/extra/mistyped argument)\n"
    )


def _signature(m: api.Method) -> str:
    inputs = " ".join(f"{n}=<{a.type.name}>" for n, a in m.inputs.items() if n != "dbg")
    return f"{m.name} {inputs}".rstrip() + f"  -> {m.output.name}"


def help_all(prog: str, extra: list[api.Method]) -> str:
    lines = [usage(prog), "methods (dbg=<string> is accepted by every method):"]
    lines += [f"  {_signature(m)}" for m in api.METHODS.values()]
    if extra:
        lines.append(f"methods specific to {prog}:")
        lines += [f"  {_signature(m)}" for m in extra if m.name not in api.METHODS]
    lines.append(f"\n{prog} METHOD --help describes one method.")
    return "\n".join(lines) + "\n"


def help_method(prog: str, m: api.Method) -> str:
    lines = [f"{prog} {_signature(m)}", "", f"  {m.description}", "", "arguments:"]
    for name, a in m.inputs.items():
        lines.append(f"  {name:<14} {a.type.name:<20} {a.description}")
        lines += _fields(a.type)
    lines.append(f"result: {m.output.name}")
    lines += _fields(
        m.output.item if m.output.kind == "list" and m.output.item else m.output
    )
    return "\n".join(lines) + "\n"


def _fields(type: api.Type) -> list[str]:
    if type.kind != "struct":
        return []
    return [
        f"      {n:<22} {f.type.name:<20} {f.description}"
        for n, f in type.fields.items()
    ]


# --- main ------------------------------------------------------------------------


def main(driver_factory: DriverFactory, argv: list[str] | None = None) -> NoReturn:
    """The body of a plugin executable; exits 0 after a wire call (see module doc)."""
    args = sys.argv[1:] if argv is None else list(argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "plugin"
    os.umask(0o077)  # host state, logs, SR metadata: root's alone
    # The response goes to a private copy of stdout; fd 1 points at stderr while
    # the driver runs, so nothing else can write into the response.  The copy is
    # not inherited by children, so none of them can hold the caller's pipe open.
    if sys.stderr is None:  # started with fd 2 closed
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    if sys.stdout is not None:
        sys.stdout.flush()
    out = _response_stream()
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
    try:
        code = run(
            driver_factory,
            args,
            stdin=stdin,
            stdout=out,
            stderr=sys.stderr,
            prog=prog,
        )
    except BaseException as e:  # noqa: BLE001 -- a bug in the runtime itself: still answer
        import traceback

        traceback.print_exc()
        _write(out, rpc.failure(to_wire(e)))
        code = EXIT_OK
    try:
        out.flush()
    except OSError:
        pass
    raise SystemExit(code)


def _response_stream() -> BinaryIO:
    """A private copy of fd 1 for the response; fd 1 then points at stderr."""
    try:
        out_fd = os.dup(1)
    except OSError:  # started with fd 1 closed: nobody reads the response
        return open(os.devnull, "wb")
    try:
        os.dup2(2, 1)
    except OSError:  # fd 2 closed: stray output goes nowhere
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    return os.fdopen(out_fd, "wb")


def run(
    driver_factory: DriverFactory,
    argv: list[str],
    *,
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    prog: str = "plugin",
) -> int:
    """Serve one call with these streams; return the exit code."""
    started = time.monotonic()
    options = {"-v", "--verbose", "--json", "--xml", "-h", "--help"}
    flags = {a for a in argv if a in options}
    args = [a for a in argv if a not in options]
    if args and args[0].startswith("--root"):
        root = args.pop(0).partition("=")[2] or (args.pop(0) if args else "")
        if not root:
            stderr.write(f"{prog}: --root needs a directory\n")
            return EXIT_USAGE
        os.environ["SM_ROOT"] = root
    verbose = bool(flags & {"-v", "--verbose"})
    want_help = bool(flags & {"-h", "--help"})

    if want_help or (not args and _isatty(stdin)) or (args and args[0] == "help"):
        return _help(
            driver_factory,
            prog,
            args[1:] if args and args[0] == "help" else args,
            stdout,
        )
    if args and args[0].startswith("-"):
        stderr.write(f"{prog}: unknown option {args[0]}\n{usage(prog)}")
        return EXIT_USAGE

    context = _setup_logging(prog, verbose, stderr)
    call = Call(driver_factory, prog, context)
    try:
        if not args or args[0].lstrip().startswith("<"):
            outcome = _wire_call(call, args, stdin, started)
            if outcome.streams() and not os.environ.get(OUTCOME_ENV):
                return _stream(call, outcome, stdout, stderr)
            response = _answer(call, outcome)
            _record_outcome(response)
            _write(stdout, response)
            return EXIT_OK
        return _by_hand(call, args, flags, stdout, stderr, started)
    finally:
        if context is not None:
            from smcommon import log

            log.shutdown()


def _record_outcome(response: bytes) -> None:
    """Keep the response in ``$SM_OUTCOME_FILE`` before answering: if the
    dispatcher that started us is gone, its next instance hands it to the
    caller's retry (dispatcher/outcomes.py).  Temp file + rename, no fsync."""
    path = os.environ.get(OUTCOME_ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(response)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        pass  # the answer on stdout still goes out


def _stream(call: Call, outcome: Outcome, stdout: BinaryIO, stderr: TextIO) -> int:
    """Write a long list answer while the rest is marshalled (the reader
    checks a piece while the next is made).  An item not of the output type
    (a bug of the driver) ends the answer there, cut short: the process
    says so on stderr and exits with EXIT_FAILURE."""
    _grow_pipe(stdout)
    try:
        stdout.writelines(outcome.pieces())
        stdout.flush()
    except (OSError, ValueError):
        pass  # the caller went away; nothing left to tell it
    except BaseException as e:
        call.log.exception("internal error writing the response")
        stderr.write(f"{call.prog}: the answer was cut short: {' '.join(to_wire(e))}\n")
        return EXIT_FAILURE
    return EXIT_OK


def _grow_pipe(stream: BinaryIO) -> None:
    """A pipe on ``stream`` that holds a piece of the answer or more, so that
    writing one returns while its reader checks it (a pipe is 64 KiB)."""
    import fcntl

    try:
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, ValueError, AttributeError):
        pass  # not a pipe, or past /proc/sys/fs/pipe-max-size: written as it drains


def _answer(call: Call, outcome: Outcome) -> bytes:
    try:
        return outcome.response()
    except BaseException as e:  # dispatch checked the value: this is a bug
        call.log.exception("internal error writing the response")
        return rpc.failure(to_wire(e))


def _wire_call(call: Call, args: list[str], stdin: BinaryIO, started: float) -> Outcome:
    try:
        if len(args) > 1:
            raise InvalidRequest(
                f"unexpected arguments after the request: {' '.join(args[1:])[:80]}"
            )
        data = (
            args[0].encode("utf-8", "surrogateescape") if args else read_request(stdin)
        )
        name, params = rpc.parse_call(data)
    except Error as e:
        call.log.info("malformed request: %s", e)
        return Outcome(None, error=to_wire(e))
    except BaseException as e:  # a bug in the parser: still answer
        call.log.exception("internal error reading the request")
        return Outcome(None, error=to_wire(e))
    return call.dispatch(name, params, started)


def _by_hand(
    call: Call,
    args: list[str],
    flags: set[str],
    stdout: BinaryIO,
    stderr: TextIO,
    started: float,
) -> int:
    name = args[0]
    try:
        method = call.method(name)
        params = by_hand_params(method, args[1:])
        method.validate(params)
    except Error as e:
        stderr.write(f"{call.prog}: {e}\n")
        return EXIT_USAGE
    except Exception as e:  # the driver factory failed
        call.log.exception("internal error")
        stderr.write(f"{call.prog}: {' '.join(to_wire(e))}\n")
        return EXIT_FAILURE
    outcome = call.dispatch(name, [params], started)
    if "--xml" in flags:
        _write(stdout, outcome.response())
    elif "--json" in flags:
        import json

        _write(
            stdout,
            (json.dumps(outcome.as_struct(), indent=2, default=str) + "\n").encode(),
        )
    elif outcome.error is not None:
        stderr.write(f"{call.prog}: {name}: {' '.join(outcome.error)}\n")
        if outcome.error[0] == "Sr_not_attached" and len(outcome.error) > 1:
            sr = outcome.error[1]
            stderr.write(
                f"  attach it first: {call.prog} SR.attach sr={sr} device_config='{{...}}'"
                " (the device_config it was created with)\n"
            )
    else:
        _write(stdout, _pretty(outcome.checked()))
    return EXIT_OK if outcome.ok else EXIT_FAILURE


def _pretty(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        text = value if value.endswith("\n") else value + "\n"
    else:
        import json

        text = json.dumps(value, indent=2, default=str) + "\n"
    return text.encode("utf-8", "replace")


def _help(
    driver_factory: DriverFactory, prog: str, args: list[str], stdout: BinaryIO
) -> int:
    call = Call(driver_factory, prog, None)
    try:
        extra = call.extra_methods()
    except BaseException:  # noqa: BLE001 -- help must work even if the driver cannot start
        extra = []
    if args and not args[0].startswith("<"):
        try:
            text = help_method(prog, api.lookup(args[0], extra))
        except Error as e:
            _write(stdout, f"{prog}: {e}\n\n{help_all(prog, extra)}".encode())
            return EXIT_USAGE
    else:
        text = help_all(prog, extra)
    _write(stdout, text.encode("utf-8", "replace"))
    return EXIT_OK


def _setup_logging(prog: str, verbose: bool, stderr: TextIO) -> CallContext | None:
    try:
        from smcommon import log
        from smcommon.paths import log_file_from_env

        return log.setup(log_file_from_env(), prog, verbose=verbose, stream=stderr)
    except Exception:  # noqa: BLE001 -- logging never fails a call
        return None


def _isatty(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _write(stream: BinaryIO, data: bytes) -> None:
    try:
        stream.write(data)
        stream.flush()
    except (OSError, ValueError):
        pass  # the caller went away; nothing left to tell it
