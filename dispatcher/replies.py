"""The dispatcher's own answers, and reading a plugin's: small helpers over ``wire``."""

from __future__ import annotations

import re
from typing import Any
from xml.parsers import expat

from dispatcher import wire

# A Success answer larger than this is checked while it arrives (below)
CHECK_AS_IT_ARRIVES = 256 * 1024
_SUCCESS_HEAD = re.compile(
    rb"\s*(<\?xml[^>]*\?>)?\s*<methodResponse>\s*<params>\s*<param>\s*<value>\s*<struct>\s*"
    rb"<member>\s*<name>Status</name>\s*<value>\s*(<string>)?Success(</string>)?\s*</value>"
)


class _Refused(Exception):
    pass


def judge(out: bytes, need_value: bool = True) -> wire.Response:
    """A plugin's stdout as a Response (``wire.WireError`` if it is none).

    A Success answer whose value the dispatcher does not need (it relays it
    byte for byte) is only checked: well-formed XML with no DTD (expat, with
    no handler per element) that begins with a ``{Status: Success}`` struct.
    Building the value of a 10,000-VDI SR.scan answer (10 MB) costs seconds;
    this costs a tenth of that (a Query.query's 2 KB: 60 -> 10 us).
    Anything else (a Failure, a fault, something else) is parsed in full.
    """
    j = Judge(need_value)
    j.feed(out, out)
    return j.result(out)


class Judge:
    """``judge``, fed the answer as it arrives (``Child``'s ``on_out``): a
    large Success answer goes through expat piece by piece while the plugin
    is still marshalling the rest (it writes a long list as it goes:
    ``smcommon.plugin``), not after its last byte."""

    def __init__(self, need_value: bool = True) -> None:
        self.need_value = need_value
        self._parser: Any = None
        self._error: wire.WireError | None = None

    def feed(self, chunk: bytes, out: bytes | bytearray) -> None:
        """``chunk`` has arrived; ``out`` is the whole answer so far."""
        if self.need_value or self._error is not None:
            return
        if self._parser is None:
            if len(out) <= CHECK_AS_IT_ARRIVES or not _SUCCESS_HEAD.match(out):
                return
            self._parser = _checker()
            chunk = bytes(out)  # from its start
        self._parse(chunk, False)

    def result(self, out: bytes) -> wire.Response:
        """What ``judge(out)`` says, ``out`` being everything fed."""
        if self._parser is not None:
            self._parse(b"", True)
        elif self.need_value or not _SUCCESS_HEAD.match(out):
            return wire.parse_response(out)
        else:  # a small answer, checked in one piece
            self._parser = _checker()
            self._parse(out, True)
        if self._error is not None:
            raise self._error
        return wire.Response(value={"Status": "Success"})

    def _parse(self, data: bytes, final: bool) -> None:
        if self._error is not None:
            return
        try:
            self._parser.Parse(data, final)
        except _Refused:
            self._error = wire.WireError("the response uses a DTD", wire.FAULT_UNSAFE)
        except expat.ExpatError as e:
            self._error = wire.WireError(f"the response is not well-formed XML: {e}")


def _checker() -> Any:
    """An expat parser that only checks (no handler per element), refusing a DTD."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse(*_args: object) -> None:
        raise _Refused

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    return parser


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
