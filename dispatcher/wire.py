"""The dispatcher's view of the XML-RPC wire: a safe parser and a few builders.

Owns:
- ``parse_call(body)``: the method name and parameters of one ``methodCall``.
- ``parse_response(body)``: the value of one ``methodResponse`` (or its fault).
- ``dumps_call`` / ``dumps_response`` / ``dumps_fault``: marshalling that
  emits ``<i8>`` for integers outside 32 bits (the SMAPI's int64 convention;
  the standard library refuses them).
- ``success`` / ``failure``: the toolstack's ``{"Status": ...}`` structs.

The parser is expat with every DTD feature refused: a document that carries a
DOCTYPE (the only way to declare entities, internal or external) is rejected
before anything is expanded, so neither "billion laughs" nor external entities
can cost memory or reach a file.  Every parse problem is a ``WireError`` with
a message that names it; nothing else escapes.
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.parsers import expat

# XML-RPC fault codes (the xmlrpc-epi "specification for fault code
# interoperability", which most XML-RPC servers use).
FAULT_PARSE = -32700
FAULT_UNSAFE = -32701  # our own: the document uses DTD features we refuse
FAULT_INVALID = -32600
FAULT_TOO_LARGE = -32702  # our own: the body exceeds the size limit
FAULT_INTERNAL = -32603

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


class WireError(Exception):
    """A body that is not the XML-RPC document expected; ``fault_code`` says why."""

    def __init__(self, message: str, fault_code: int = FAULT_PARSE) -> None:
        super().__init__(message)
        self.fault_code = fault_code


class _Refused(Exception):
    pass


@dataclass(frozen=True)
class Call:
    method: str
    params: tuple[Any, ...]

    @property
    def arg(self) -> dict[str, Any]:
        """The single struct argument of an SMAPI call, or {} if there is none."""
        if len(self.params) == 1 and isinstance(self.params[0], dict):
            return self.params[0]
        return {}


@dataclass(frozen=True)
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


def _refuse(what: str) -> Callable[..., None]:
    def handler(*_args: object) -> None:
        raise _Refused(what)

    return handler


def _parse(
    body: bytes, what: str
) -> tuple[str | None, str | None, tuple[Any, ...] | None, tuple[int, str] | None]:
    """Parse ``body``; return (root tag, method name, params, fault)."""
    if not body.strip():
        raise WireError(f"the {what} is empty")
    target = xmlrpc.client.Unmarshaller()
    parser = expat.ParserCreate(None, None)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    root: list[str] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        if not root:
            root.append(tag)
        target.start(tag, attrs)

    parser.StartElementHandler = start
    parser.EndElementHandler = target.end
    parser.CharacterDataHandler = target.data
    parser.StartDoctypeDeclHandler = _refuse("a DOCTYPE declaration")
    parser.EntityDeclHandler = _refuse("an ENTITY declaration")
    parser.ExternalEntityRefHandler = _refuse("an external entity reference")  # type: ignore[assignment]
    parser.SkippedEntityHandler = _refuse("an undeclared entity reference")
    target.xml(None, None)  # type: ignore[arg-type]
    try:
        parser.Parse(body, True)
    except _Refused as e:
        raise WireError(
            f"the {what} uses {e}: DTDs and entities are not accepted", FAULT_UNSAFE
        ) from None
    except expat.ExpatError as e:
        raise WireError(f"the {what} is not well-formed XML: {e}") from None
    except (
        ValueError,
        TypeError,
        OverflowError,
        IndexError,
        KeyError,
        xmlrpc.client.ResponseError,
    ) as e:
        # IndexError/KeyError: xmlrpc's unmarshaller on a <member> without a
        # <name>, or a <name> without a <value>.
        raise WireError(
            f"the {what} holds a malformed XML-RPC value: {type(e).__name__} {e}",
            FAULT_INVALID,
        ) from None
    fault: tuple[int, str] | None = None
    params: tuple[Any, ...] | None = None
    try:
        params = target.close()
    except xmlrpc.client.Fault as f:
        fault = (
            int(f.faultCode) if isinstance(f.faultCode, int) else FAULT_INTERNAL,
            str(f.faultString),
        )
    except (xmlrpc.client.ResponseError, IndexError, TypeError, KeyError) as e:
        raise WireError(
            f"the {what} is not a complete XML-RPC document ({type(e).__name__})",
            FAULT_INVALID,
        ) from None
    return (root[0] if root else None), target.getmethodname(), params, fault


def parse_call(body: bytes) -> Call:
    """The method and parameters of one XML-RPC ``methodCall``."""
    root, method, params, fault = _parse(body, "request")
    if root != "methodCall":
        raise WireError(f"the request is a <{root}>, not a <methodCall>", FAULT_INVALID)
    if fault is not None or params is None:
        raise WireError("the request holds a fault, not parameters", FAULT_INVALID)
    if not method:
        raise WireError("the request has no <methodName>", FAULT_INVALID)
    return Call(method.strip(), params)


def parse_response(body: bytes) -> Response:
    """The value of one XML-RPC ``methodResponse`` holding one value, or its fault."""
    root, _method, params, fault = _parse(body, "response")
    if root != "methodResponse":
        raise WireError(
            f"the response is a <{root}>, not a <methodResponse>", FAULT_INVALID
        )
    if fault is not None:
        return Response(fault=fault)
    if params is None or len(params) != 1:
        raise WireError(
            f"the response holds {0 if params is None else len(params)} values, not 1",
            FAULT_INVALID,
        )
    return Response(value=params[0])


class _Marshaller(xmlrpc.client.Marshaller):
    """The standard marshaller, but int64 values go out as ``<i8>``."""

    dispatch = dict(xmlrpc.client.Marshaller.dispatch)  # noqa: RUF012 -- a copy, never shared

    def dump_long(self, value: int, write: Callable[[str], Any]) -> None:
        tag = "int" if INT32_MIN <= value <= INT32_MAX else "i8"
        write(f"<value><{tag}>{int(value)}</{tag}></value>\n")

    dispatch[int] = dump_long  # type: ignore[assignment]


def _marshal(values: tuple[Any, ...] | xmlrpc.client.Fault) -> str:
    return _Marshaller("utf-8", allow_none=False).dumps(values)


def dumps_call(method: str, *params: Any) -> bytes:
    body = _marshal(params)
    name = xmlrpc.client.escape(method)
    return (
        f"<?xml version='1.0'?>\n<methodCall>\n<methodName>{name}</methodName>\n{body}</methodCall>\n"
    ).encode()


def dumps_response(value: Any) -> bytes:
    body = _marshal((value,))
    return (
        f"<?xml version='1.0'?>\n<methodResponse>\n{body}</methodResponse>\n".encode()
    )


def dumps_fault(code: int, message: str) -> bytes:
    body = _marshal(xmlrpc.client.Fault(code, message))
    return (
        f"<?xml version='1.0'?>\n<methodResponse>\n{body}</methodResponse>\n".encode()
    )


def success(value: Any = "") -> dict[str, Any]:
    return {"Status": "Success", "Value": value}


def failure(description: list[str]) -> dict[str, Any]:
    return {"Status": "Failure", "ErrorDescription": [str(d) for d in description]}
