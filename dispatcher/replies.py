"""The dispatcher's own answers, and reading a plugin's: small helpers over ``wire``."""

from __future__ import annotations

import re

from dispatcher import wire

# A response larger than this is judged without building its value (below)
FULL_PARSE_LIMIT = 256 * 1024
_SUCCESS_HEAD = re.compile(
    rb"\s*(<\?xml[^>]*\?>)?\s*<methodResponse>\s*<params>\s*<param>\s*<value>\s*<struct>\s*"
    rb"<member>\s*<name>Status</name>\s*<value>\s*(<string>)?Success(</string>)?\s*</value>"
)


class _Refused(Exception):
    pass


def judge(out: bytes, need_value: bool = True) -> wire.Response:
    """A plugin's stdout as a Response (``wire.WireError`` if it is none).

    A large answer whose value the dispatcher does not need (it relays it
    byte for byte) is only checked: well-formed XML with no DTD (expat, with
    no handler per element) that begins with a ``{Status: Success}`` struct.
    Building the value of a 10,000-VDI SR.scan answer (10 MB) costs seconds;
    this costs a tenth of that.  Anything else is parsed in full.
    """
    if need_value or len(out) <= FULL_PARSE_LIMIT or not _SUCCESS_HEAD.match(out):
        return wire.parse_response(out)
    from xml.parsers import expat

    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse(*_args: object) -> None:
        raise _Refused

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(out, True)
    except _Refused:
        raise wire.WireError("the response uses a DTD", wire.FAULT_UNSAFE) from None
    except expat.ExpatError as e:
        raise wire.WireError(f"the response is not well-formed XML: {e}") from None
    return wire.Response(value={"Status": "Success"})


def fail(*description: str) -> bytes:
    """A Failure response with this ErrorDescription."""
    return wire.dumps_response(wire.failure(list(description)))


def backend(code: str, *details: str) -> bytes:
    """``Backend_error <code> <details...>``."""
    return fail("Backend_error", code, *details)


def parse_or_none(out: bytes) -> wire.Response | None:
    try:
        return wire.parse_response(out)
    except wire.WireError:
        return None


def describe(out: bytes, resp: wire.Response | None) -> list[str]:
    """What a failed plugin answer says, in words."""
    if resp is not None and resp.fault is not None:
        return [f"fault {resp.fault[0]}: {resp.fault[1]}"]
    if resp is not None:
        return resp.error
    try:
        return wire.parse_response(out).error
    except wire.WireError:
        return ["(no response)"]


def outcome(out: bytes) -> str:
    """One word for the log line of a response."""
    try:
        return wire.parse_response(out).outcome
    except wire.WireError:
        return "Invalid"
