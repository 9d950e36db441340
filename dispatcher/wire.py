"""The dispatcher's view of the XML-RPC wire: fault codes over ``smcommon.rpc``.

The parsing and marshalling are the project's one XML-RPC stack,
``smcommon.rpc`` (expat with every DTD feature refused, int64 as ``<i8>``).
This module adds what only the daemon and its clients need:

- ``parse_call(body)`` / ``parse_response(body)`` as ``Call`` / ``Response``
  records, every problem a ``WireError`` whose ``fault_code`` says what kind
  of problem it was (the XML-RPC fault the daemon answers with);
- ``dumps_call`` / ``dumps_response`` / ``dumps_fault`` (re-exported);
- ``success`` / ``failure``: the toolstack's ``{"Status": ...}`` structs.
"""

from __future__ import annotations

from typing import Any

from smcommon import rpc
from smcommon.errors import InvalidRequest
from smcommon.record import record

# XML-RPC fault codes (the xmlrpc-epi "specification for fault code
# interoperability", which most XML-RPC servers use).
FAULT_PARSE = -32700
FAULT_UNSAFE = -32701  # our own: the document uses DTD features we refuse
FAULT_INVALID = -32600
FAULT_TOO_LARGE = -32702  # our own: the body exceeds the size limit
FAULT_INTERNAL = -32603

dumps_call = rpc.dumps_call
dumps_response = rpc.dumps_response
dumps_fault = rpc.dumps_fault


class WireError(Exception):
    """A body that is not the XML-RPC document expected; ``fault_code`` says why."""

    def __init__(self, message: str, fault_code: int = FAULT_PARSE) -> None:
        super().__init__(message)
        self.fault_code = fault_code


@record(frozen=True)
class Call:
    method: str
    params: tuple[Any, ...]

    @property
    def arg(self) -> dict[str, Any]:
        """The single struct argument of an SMAPI call, or {} if there is none."""
        if len(self.params) == 1 and isinstance(self.params[0], dict):
            return self.params[0]
        return {}


@record(frozen=True)
class Response:
    """One methodResponse: ``value`` or, for a fault, ``fault`` (code, string)."""

    value: Any = None
    fault: tuple[int, str] | None = None

    @property
    def status(self) -> str:
        """``Success`` / ``Failure`` of a toolstack struct, else ``Fault`` / ``Other``."""
        if self.fault is not None:
            return "Fault"
        if isinstance(self.value, dict) and self.value.get("Status") in (
            "Success",
            "Failure",
        ):
            return str(self.value["Status"])
        return "Other"

    @property
    def error(self) -> list[str]:
        """The ErrorDescription of a Failure (strings), else []."""
        if self.status != "Failure":
            return []
        desc = self.value.get("ErrorDescription")
        if isinstance(desc, list):
            return [str(d) for d in desc]
        return [str(desc)]

    @property
    def outcome(self) -> str:
        """One word for the log line: Success, or the error name."""
        if self.fault is not None:
            return f"Fault:{self.fault[0]}"
        if self.status == "Failure":
            err = self.error
            if len(err) > 1 and err[0] == "Backend_error":
                return f"Backend_error:{err[1]}"
            return err[0] if err else "Failure"
        return self.status


def _wire_error(e: InvalidRequest) -> WireError:
    if isinstance(e, rpc.UnsafeXml):
        return WireError(f"{e.reason}: DTDs and entities are not accepted", FAULT_UNSAFE)
    if isinstance(e, rpc.TooLarge):
        return WireError(e.reason, FAULT_TOO_LARGE)
    if isinstance(e, rpc.NotXml):
        return WireError(e.reason, FAULT_PARSE)
    return WireError(e.reason, FAULT_INVALID)


def parse_call(body: bytes, limit: int = 1 << 62) -> Call:
    """The method and parameters of one XML-RPC ``methodCall``."""
    try:
        method, params = rpc.parse_call(body, limit)
    except InvalidRequest as e:
        raise _wire_error(e) from None
    return Call(method.strip(), tuple(params))


def parse_response(body: bytes, limit: int = 1 << 62) -> Response:
    """The value of one XML-RPC ``methodResponse`` holding one value, or its fault."""
    try:
        reply = rpc.parse_response(body, limit)
    except InvalidRequest as e:
        raise _wire_error(e) from None
    return Response(value=reply.value, fault=reply.fault)


def success(value: Any = "") -> dict[str, Any]:
    return {"Status": "Success", "Value": value}


def failure(description: list[str]) -> dict[str, Any]:
    return {"Status": "Failure", "ErrorDescription": [str(d) for d in description]}
