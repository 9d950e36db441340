"""The error tree of the storage manager, and how an error looks on the wire.

    Error                         root: every error this library raises on purpose
     +-- SmapiError               the errors of the SMAPI interface (docs/api.md)
     |    +-- SrNotAttached       Sr_not_attached(sr)
     |    +-- VdiDoesNotExist     Vdi_does_not_exist(vdi)
     |    +-- IllegalTransition   Illegal_transition(from, to)
     |    +-- BackendError        Backend_error(code, [detail, ...])
     |    +-- Unimplemented       Unimplemented(method)
     |    +-- DoesNotExist        Does_not_exist(kind, id)
     |    +-- Cancelled           Cancelled(task)
     |    +-- Redirect            Redirect(address)
     |    +-- SrAttached          Sr_attached(sr)
     +-- InvalidRequest           a malformed request (bad XML, wrong type, missing key)
     +-- CommandError             an outside command failed (smcommon.runner)
     +-- CommandTimeout           an outside command ran past its timeout
     +-- LockTimeout              a lock could not be taken in time
     +-- (module errors)          e.g. smcommon.vhd's VhdError tree

Every ``Error`` has a ``msg`` template formatted with ``self`` and a stable
``code``.  Errors that are not SMAPI errors reach the wire as
``Backend_error(code, [str(error)])``; anything else that escapes is a bug and
becomes ``Backend_error("INTERNAL_ERROR", ...)``.  Only the plugin entry point
turns errors into responses (``to_wire``).
"""

from __future__ import annotations

from collections.abc import Sequence


class Error(Exception):
    """Root of the tree.  Subclasses set ``msg`` and ``code``."""

    msg = "{self.reason}"
    code = "ERROR"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.msg.format(self=self)


# --- SMAPI errors -----------------------------------------------------------


class SmapiError(Error):
    """An error of the SMAPI interface: ``wire_name`` and ``wire_args()``."""

    wire_name = ""
    when = ""  # one line for the API reference (docs/api.md)

    def wire_args(self) -> list[str]:
        raise NotImplementedError


class SrNotAttached(SmapiError):
    when = "the SR must be attached (on this host) to access its VDIs"
    wire_name = "Sr_not_attached"
    msg = "SR {self.sr} is not attached"

    def __init__(self, sr: str) -> None:
        super().__init__(sr)
        self.sr = sr

    def wire_args(self) -> list[str]:
        return [self.sr]


class SrAttached(SmapiError):
    when = "the operation needs the SR detached"
    wire_name = "Sr_attached"
    msg = "SR {self.sr} is attached"

    def __init__(self, sr: str) -> None:
        super().__init__(sr)
        self.sr = sr

    def wire_args(self) -> list[str]:
        return [self.sr]


class VdiDoesNotExist(SmapiError):
    when = "the VDI is not in the SR"
    wire_name = "Vdi_does_not_exist"
    msg = "VDI {self.vdi} does not exist"

    def __init__(self, vdi: str) -> None:
        super().__init__(vdi)
        self.vdi = vdi

    def wire_args(self) -> list[str]:
        return [self.vdi]


class IllegalTransition(SmapiError):
    when = "a datapath state change that the lifecycle forbids"
    wire_name = "Illegal_transition"
    msg = "illegal datapath transition from {self.from_state} to {self.to_state}"

    def __init__(self, from_state: str, to_state: str) -> None:
        super().__init__(f"{from_state} -> {to_state}")
        self.from_state = from_state
        self.to_state = to_state

    def wire_args(self) -> list[str]:
        return [self.from_state, self.to_state]


class BackendError(SmapiError):
    """A backend failure with a stable ``code`` and a list of details."""

    when = "a backend failure: a command failed, disk full, corrupt image ... (the code is stable)"

    wire_name = "Backend_error"
    msg = "{self.code}: {self.detail_text}"

    def __init__(self, code: str, details: Sequence[str] = ()) -> None:
        super().__init__(code)
        self.code = code
        self.details = [str(d) for d in details]

    @property
    def detail_text(self) -> str:
        return "; ".join(self.details)

    def wire_args(self) -> list[str]:
        return [self.code, *self.details]


class Unimplemented(SmapiError):
    when = "the plugin does not implement this method"
    wire_name = "Unimplemented"
    msg = "method {self.method} is not implemented"

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.method = method

    def wire_args(self) -> list[str]:
        return [self.method]


class DoesNotExist(SmapiError):
    when = "some other object (a task, ...) does not exist"
    wire_name = "Does_not_exist"
    msg = "{self.kind} {self.id} does not exist"

    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"{kind} {id}")
        self.kind = kind
        self.id = id

    def wire_args(self) -> list[str]:
        return [self.kind, self.id]


class Cancelled(SmapiError):
    when = "the call was cancelled (Dispatcher.cancel)"
    wire_name = "Cancelled"
    msg = "task {self.task} was cancelled"

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.task = task

    def wire_args(self) -> list[str]:
        return [self.task]


class Redirect(SmapiError):
    when = "resend the request to this address"
    wire_name = "Redirect"
    msg = "resend the request to {self.address}"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address

    def wire_args(self) -> list[str]:
        return [self.address]


# --- library errors ---------------------------------------------------------


class InvalidRequest(Error):
    """The request is not a valid call: bad XML, unknown method, bad argument."""

    code = "INVALID_REQUEST"
    msg = "invalid request: {self.reason}"


class CommandError(Error):
    """An outside command exited with a code its caller did not allow."""

    code = "COMMAND_FAILED"
    msg = "command {self.cmd} failed with exit code {self.rc}: {self.err_tail}"

    def __init__(self, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        super().__init__(f"{argv[0] if argv else '?'} rc={rc}")
        self.argv = list(argv)
        self.rc = rc
        self.out = out
        self.err = err

    @property
    def cmd(self) -> str:
        return " ".join(self.argv)

    @property
    def err_tail(self) -> str:
        text = self.err.strip() or self.out.strip()
        return text[-2000:]


class CommandTimeout(Error):
    """An outside command ran past its timeout and was killed."""

    code = "COMMAND_TIMEOUT"
    msg = "command {self.cmd} did not finish within {self.timeout}s and was killed"

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(argv[0] if argv else "?")
        self.argv = list(argv)
        self.timeout = timeout

    @property
    def cmd(self) -> str:
        return " ".join(self.argv)


class LockTimeout(Error):
    """A lock (SR, VDI) was held by another operation for longer than the wait allowed."""

    code = "LOCK_TIMEOUT"
    msg = "could not take lock {self.name} within {self.timeout}s (held by another operation)"

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(name)
        self.name = name
        self.timeout = timeout


# --- the wire ---------------------------------------------------------------


def to_wire(exc: BaseException) -> list[str]:
    """The ErrorDescription of a failure: the error's name, then its arguments."""
    if isinstance(exc, SmapiError):
        return [exc.wire_name, *exc.wire_args()]
    if isinstance(exc, Error):
        return ["Backend_error", exc.code, str(exc)]
    return ["Backend_error", "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"]
