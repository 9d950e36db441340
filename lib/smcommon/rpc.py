"""The project's one XML-RPC stack: calls and responses, parsed and built.

This module owns the wire format (docs/api.md, "Wire conventions"); the
plugins, the dispatcher (``dispatcher.wire`` adds fault codes on top) and
the remote copy all use it:

- ``parse_call(data)`` parses one methodCall, ``parse_response(data)`` one
  methodResponse (a value or a fault), with expat directly (cheap to import,
  no xmlrpc.client): ``<i4>``, ``<int>``, ``<i8>``, ``<boolean>``,
  ``<string>`` (and bare text), ``<double>``, ``<base64>``,
  ``<dateTime.iso8601>`` (kept as its text), ``<nil/>``, ``<struct>``,
  ``<array>``.  A DOCTYPE (and so any entity declaration: entity expansion,
  external entities) is refused, as are documents over ``MAX_REQUEST`` bytes
  (or the caller's limit) or nested deeper than ``MAX_DEPTH``.  Every problem
  is an ``InvalidRequest`` (``NotXml``, ``UnsafeXml``, ``TooLarge`` for the
  document as a whole) that says what is wrong and where.
- ``dumps_call`` / ``dumps_response`` / ``dumps_fault`` marshal plain Python
  values (ints of 32 bits as ``<int>``, larger ones as ``<i8>``).
- ``success(value, type)`` builds ``{"Status": "Success", "Value": value}``,
  marshalled by the method's declared output type, and checked against it as
  it is (``Type.convert``'s rules, in the same pass: an ``InvalidRequest`` if
  it is not one): a struct's fields in the type's order, a missing one as its
  default, an unknown one left out; int64 is always ``<i8>`` (xmlrpc.client
  writes ``<int>`` and refuses values past 2**31); a unit result is ``<nil/>``.
  ``success_pieces`` is the same answer of a list in pieces, to write as they
  come.  ``failure(description)`` builds ``{"Status": "Failure",
  "ErrorDescription": [...]}`` (a flat list of strings).
- Strings are XML-escaped; ``\\r`` is written as ``&#13;`` so it survives;
  characters XML 1.0 cannot carry (control characters, lone surrogates) become
  U+FFFD, so a response is always well-formed UTF-8.
"""

from __future__ import annotations

from smcommon.api import INT64_MAX, INT64_MIN
from smcommon.errors import InvalidRequest

TYPE_CHECKING = False  # typing itself costs an import in every plugin call
if TYPE_CHECKING:
    from collections.abc import Iterator

    from smcommon.api import Type

MAX_REQUEST = 1 << 20  # bytes; a real request is a few KiB at most
MAX_DEPTH = 32  # nested value containers

class NotXml(InvalidRequest):
    """The document is empty or not well-formed XML."""


class UnsafeXml(InvalidRequest):
    """The document carries a DOCTYPE or entity declarations."""


class TooLarge(InvalidRequest):
    """The document is larger than the limit."""


class Reply:
    """One methodResponse: its ``value``, or its ``fault`` as (code, string)."""

    __slots__ = ("fault", "value")

    def __init__(self, value: object = None, fault: tuple[int, str] | None = None) -> None:
        self.value = value
        self.fault = fault


_SCALARS = {
    "i4",
    "int",
    "i8",
    "boolean",
    "string",
    "double",
    "base64",
    "dateTime.iso8601",
    "nil",
}


class _Frame:
    """A container being built: the params list, an array or a struct."""

    __slots__ = ("items", "key", "kind")

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "params" | "array" | "struct"
        self.items: list[object] | dict[str, object] = {} if kind == "struct" else []
        self.key: str | None = None


class _Parser:
    def __init__(self) -> None:
        self.root: str | None = None
        self.method: str | None = None
        self.params: list[object] | None = None
        self.fault: object = _NOTHING
        self.path: list[str] = []  # open element names
        self.text: list[str] = []
        self.frames: list[_Frame] = []
        self.value: object = _NOTHING  # the value of the <value> being closed

    # expat handlers -----------------------------------------------------------

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        parent = self.path[-1] if self.path else None
        if not _allowed(parent, tag):
            where = f"inside <{parent}>" if parent else "as the document element"
            raise InvalidRequest(f"unexpected element <{tag}> {where}")
        if parent is None:
            self.root = tag
        self.path.append(tag)
        self.text = []
        if tag == "value":
            self.value = _NOTHING
            return
        if parent == "value" and self.value is not _NOTHING:
            raise InvalidRequest("a <value> holds more than one value")
        if tag in ("params", "array", "struct", "fault"):
            if len(self.frames) > MAX_DEPTH:
                raise InvalidRequest(
                    f"values are nested deeper than {MAX_DEPTH} levels"
                )
            self.frames.append(_Frame(tag))

    def chars(self, data: str) -> None:
        self.text.append(data)

    def end(self, tag: str) -> None:
        self.path.pop()
        text = "".join(self.text)
        self.text = []
        if tag == "methodName":
            self.method = text.strip()
        elif tag in _SCALARS:
            self.value = _scalar(tag, text)
        elif tag in ("array", "struct"):
            frame = self.frames.pop()
            self.value = frame.items
        elif tag == "params":
            self.params = self.frames.pop().items  # type: ignore[assignment]
        elif tag == "fault":
            items = self.frames.pop().items
            assert isinstance(items, list)
            self.fault = items[0] if items else None
        elif tag == "name":
            self.frames[-1].key = text
        elif tag == "value":
            value = self.value
            if value is _NOTHING:
                value = text  # <value>text</value> is a string
            self._deliver(value)
        elif tag == "member":
            frame = self.frames[-1]
            if frame.key is not None:
                raise InvalidRequest(f"struct member {frame.key!r} has no <value>")

    def _deliver(self, value: object) -> None:
        frame = self.frames[-1]
        if frame.kind == "struct":
            if frame.key is None:
                raise InvalidRequest("struct member has no <name> before its <value>")
            items = frame.items
            assert isinstance(items, dict)
            items[frame.key] = value
            frame.key = None
        else:
            items2 = frame.items
            assert isinstance(items2, list)
            items2.append(value)

    @staticmethod
    def refuse_doctype(*_args: object) -> None:
        raise UnsafeXml("DOCTYPE and entity declarations are not allowed")


class _Nothing:
    pass


_NOTHING = _Nothing()

_CHILDREN = {
    None: {"methodCall", "methodResponse"},
    "methodCall": {"methodName", "params"},
    "methodResponse": {"params", "fault"},
    "fault": {"value"},
    "params": {"param"},
    "param": {"value"},
    "value": _SCALARS | {"struct", "array"},
    "struct": {"member"},
    "member": {"name", "value"},
    "array": {"data"},
    "data": {"value"},
}


def _allowed(parent: str | None, tag: str) -> bool:
    return tag in _CHILDREN.get(parent, ())


def _scalar(tag: str, text: str) -> object:
    if tag in ("i4", "int", "i8"):
        t = text.strip()
        digits = t[1:] if t[:1] in "+-" else t
        if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
            raise InvalidRequest(f"<{tag}> holds {text[:40]!r}, not an integer")
        return int(t)
    if tag == "boolean":
        t = text.strip().lower()
        if t in ("1", "true"):
            return True
        if t in ("0", "false"):
            return False
        raise InvalidRequest(f"<boolean> holds {text[:40]!r}, not 0 or 1")
    if tag == "string" or tag == "dateTime.iso8601":
        return text
    if tag == "double":
        try:
            return float(text.strip())
        except ValueError:
            raise InvalidRequest(
                f"<double> holds {text[:40]!r}, not a number"
            ) from None
    if tag == "base64":
        import binascii

        try:
            return binascii.a2b_base64(text.encode("ascii", "replace"))
        except binascii.Error:
            raise InvalidRequest("<base64> does not hold base64 data") from None
    return None  # nil


def _parse(data: bytes | str, what: str, limit: int) -> _Parser:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > limit:
        raise TooLarge(f"the {what} is larger than {limit} bytes")
    if not data.strip():
        raise NotXml(f"the {what} is empty (expected an XML-RPC document)")
    from xml.parsers import expat

    handler = _Parser()
    parser = expat.ParserCreate()
    parser.buffer_text = True
    parser.StartElementHandler = handler.start
    parser.EndElementHandler = handler.end
    parser.CharacterDataHandler = handler.chars
    parser.StartDoctypeDeclHandler = handler.refuse_doctype
    parser.EntityDeclHandler = handler.refuse_doctype
    parser.ExternalEntityRefHandler = handler.refuse_doctype  # type: ignore[assignment]
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise NotXml(
            f"the {what} is not well-formed XML: {expat.ErrorString(e.code)} "
            f"at line {e.lineno}, column {e.offset}"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"the {what} is nested too deeply") from None
    return handler


def parse_call(data: bytes | str, limit: int = MAX_REQUEST) -> tuple[str, list[object]]:
    """The method name and the parameters of one XML-RPC methodCall."""
    handler = _parse(data, "request", limit)
    if handler.root != "methodCall":
        raise InvalidRequest(
            f"the request is a <{handler.root}>, not a <methodCall>"
        )
    if handler.method is None:
        raise InvalidRequest(
            "the request is not an XML-RPC methodCall (no <methodName>)"
        )
    if not handler.method:
        raise InvalidRequest("the request's <methodName> is empty")
    return handler.method, handler.params or []


def parse_response(data: bytes | str, limit: int = MAX_REQUEST) -> Reply:
    """The one value (or the fault) of an XML-RPC methodResponse."""
    handler = _parse(data, "response", limit)
    if handler.root != "methodResponse":
        raise InvalidRequest(
            f"the response is a <{handler.root}>, not a <methodResponse>"
        )
    if handler.fault is not _NOTHING:
        fault = handler.fault
        code = fault.get("faultCode") if isinstance(fault, dict) else None
        text = fault.get("faultString") if isinstance(fault, dict) else None
        if not isinstance(code, int) or isinstance(code, bool) or not isinstance(text, str):
            raise InvalidRequest("the response's <fault> is not {faultCode, faultString}")
        return Reply(fault=(code, text))
    params = handler.params or []
    if len(params) != 1:
        raise InvalidRequest(f"the response holds {len(params)} values, not 1")
    return Reply(value=params[0])


# --- responses ---------------------------------------------------------------


def _escape_table() -> dict[int, str]:
    table = {c: "\ufffd" for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)}
    table.update({ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;", 0x0D: "&#13;"})
    table.update({0xFFFE: "\ufffd", 0xFFFF: "\ufffd"})
    return table


_ESCAPE = _escape_table()


def escape(text: str) -> str:
    """``text`` as XML character data (lone surrogates are fixed at encoding)."""
    # printable text holds no control character, surrogate or U+FFFE/U+FFFF
    if text.isprintable() and "&" not in text and "<" not in text and ">" not in text:
        return text
    return text.translate(_ESCAPE)


def _marshal(out: list[str], value: object, type: Type | None) -> None:
    """Append ``<value>...</value>`` for ``value``, checked against ``type``
    when given (``InvalidRequest`` if it is not one)."""
    kind = type.kind if type is not None else "any"
    if kind == "struct":
        _marshal_struct(out, value, type)  # type: ignore[arg-type]
    elif kind == "list":
        if value.__class__ is not list and value.__class__ is not tuple:
            type.convert(value, "result")  # type: ignore[union-attr] -- raises
        out.append("<value><array><data>")
        item = type.item  # type: ignore[union-attr]
        for v in value:  # type: ignore[attr-defined]
            _marshal(out, v, item)
        out.append("</data></array></value>")
    elif kind == "unit":
        out.append("<value><nil/></value>")
    elif kind == "any":
        _marshal_any(out, value)
    else:
        _marshal_scalar(out, type.convert(value, "result"), kind)  # type: ignore[union-attr]


def _marshal_scalar(out: list[str], value: object, kind: str) -> None:
    """A string, key, int64, bool or string map already checked."""
    if kind == "int64":
        out.append(f"<value><i8>{value}</i8></value>")
    elif kind == "bool":
        out.append("<value><boolean>1</boolean></value>" if value else _FALSE)
    elif kind == "map":
        out.append("<value><struct>")
        for k, v in value.items():  # type: ignore[attr-defined]
            out.append(f"<member><name>{escape(k)}</name><value>{escape(v)}</value></member>")
        out.append("</struct></value>")
    else:
        out.append(f"<value>{escape(str(value))}</value>")


_FALSE = "<value><boolean>0</boolean></value>"
_MISSING = object()


def _marshal_struct(out: list[str], value: dict[str, object], type: Type) -> None:
    """A struct by its fields, scalars of their exact type inline (SR.scan
    marshals 10,000 of them)."""
    if value.__class__ is not dict:
        type.convert(value, "result")  # raises, or it is a dict of another class
        value = dict(value)
    append = out.append
    append("<value><struct>")
    for name, f, exact in type.plan:
        v = value.get(name, _MISSING)
        if v is _MISSING:
            v = f.default_value()
            if v is None:
                append(f"<member><name>{name}</name><value><nil/></value></member>")
                continue
        # a field's name is plain text
        if v.__class__ is exact:
            if exact is str:
                append(f"<member><name>{name}</name><value>{escape(v)}</value></member>")  # type: ignore[arg-type]
                continue
            if exact is bool:
                append(_BOOL_MEMBER[v] % name)  # type: ignore[index]
                continue
            if INT64_MIN <= v <= INT64_MAX:  # type: ignore[operator]
                append(f"<member><name>{name}</name><value><i8>{v}</i8></value></member>")
                continue
        append(f"<member><name>{name}</name>")
        _marshal(out, v, f.type)
        append("</member>")
    append("</struct></value>")


_BOOL_MEMBER = {
    True: "<member><name>%s</name><value><boolean>1</boolean></value></member>",
    False: "<member><name>%s</name><value><boolean>0</boolean></value></member>",
}


def _marshal_any(out: list[str], value: object) -> None:
    """Marshal by Python type (results of ANY, error descriptions)."""
    if value is None:
        out.append("<value><nil/></value>")
    elif isinstance(value, bool):
        out.append(f"<value><boolean>{int(value)}</boolean></value>")
    elif isinstance(value, int):
        tag = "int" if -(2**31) <= value < 2**31 else "i8"
        out.append(f"<value><{tag}>{value}</{tag}></value>")
    elif isinstance(value, float):
        out.append(f"<value><double>{value!r}</double></value>")
    elif isinstance(value, str):
        out.append(f"<value>{escape(value)}</value>")
    elif isinstance(value, (bytes, bytearray)):
        import binascii

        out.append(
            f"<value><base64>{binascii.b2a_base64(bytes(value)).decode().strip()}</base64></value>"
        )
    elif isinstance(value, dict):
        out.append("<value><struct>")
        for k, v in value.items():
            out.append(f"<member><name>{escape(str(k))}</name>")
            _marshal_any(out, v)
            out.append("</member>")
        out.append("</struct></value>")
    elif isinstance(value, (list, tuple)):
        out.append("<value><array><data>")
        for v in value:
            _marshal_any(out, v)
        out.append("</data></array></value>")
    else:
        out.append(f"<value>{escape(str(value))}</value>")


def _response(members: list[str]) -> bytes:
    return "".join([_DOC_HEAD, *members, _DOC_TAIL]).encode("utf-8", "replace")


def success(value: object, type: Type | None = None) -> bytes:
    """The methodResponse of a call that returned ``value`` of ``type``."""
    out = [_SUCCESS_HEAD]
    _marshal(out, value, type)
    out.append("</member>")
    return _response(out)


def success_pieces(value: list[object], type: Type, items: int = 500) -> Iterator[bytes]:
    """``success`` of a list, in pieces of ``items`` items: a piece can be
    written out while the next is marshalled (an SR.scan of 10,000 VDIs is
    10 MB).  ``InvalidRequest`` from the piece with an item not of the type."""
    if type.kind != "list" or value.__class__ is not list:
        yield success(value, type)
        return
    item = type.item
    out = [_DOC_HEAD, _SUCCESS_HEAD, "<value><array><data>"]
    for i in range(0, len(value), items):
        for v in value[i : i + items]:
            _marshal(out, v, item)
        yield "".join(out).encode("utf-8", "replace")
        out.clear()
    yield ("</data></array></value></member>" + _DOC_TAIL).encode()


_DOC_HEAD = "<?xml version='1.0' encoding='UTF-8'?>\n<methodResponse><params><param><value><struct>"
_DOC_TAIL = "</struct></value></param></params></methodResponse>\n"
_SUCCESS_HEAD = "<member><name>Status</name><value>Success</value></member><member><name>Value</name>"


def failure(description: list[str]) -> bytes:
    """The methodResponse of a call that failed: ErrorDescription is a flat string list."""
    out = [
        "<member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name>"
    ]
    _marshal_any(out, [str(d) for d in description])
    out.append("</member>")
    return _response(out)


def dumps_call(method: str, *params: object) -> bytes:
    """A methodCall of plain Python values (SMAPI calls take one struct)."""
    out = [f"<?xml version='1.0'?>\n<methodCall><methodName>{escape(method)}</methodName><params>"]
    for p in params:
        out.append("<param>")
        _marshal_any(out, p)
        out.append("</param>")
    out.append("</params></methodCall>\n")
    return "".join(out).encode("utf-8", "replace")


def dumps_response(value: object) -> bytes:
    """A methodResponse holding one plain Python value."""
    out = ["<?xml version='1.0' encoding='UTF-8'?>\n<methodResponse><params><param>"]
    _marshal_any(out, value)
    out.append("</param></params></methodResponse>\n")
    return "".join(out).encode("utf-8", "replace")


def dumps_fault(code: int, message: str) -> bytes:
    """A methodResponse holding a fault."""
    out = ["<?xml version='1.0' encoding='UTF-8'?>\n<methodResponse><fault>"]
    _marshal_any(out, {"faultCode": int(code), "faultString": message})
    out.append("</fault></methodResponse>\n")
    return "".join(out).encode("utf-8", "replace")
