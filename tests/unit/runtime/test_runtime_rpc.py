"""smcommon.rpc: parsing one methodCall, building one methodResponse."""

from __future__ import annotations

import xmlrpc.client
from xml.parsers import expat

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smcommon import api, rpc
from smcommon.errors import InvalidRequest

# what xmlrpc.client can write: ints within <int>'s 32 bits, text XML can carry
xml_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters="\r\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f"
        "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\ufffe\uffff",
    ),
    max_size=30,
)
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**31), max_value=2**31 - 1)
    | xml_text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(xml_text, children, max_size=4)
    ),
    max_leaves=20,
)


def call(method: str, *params: object) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def loads(data: bytes) -> object:
    (body,), method = xmlrpc.client.loads(data.decode("utf-8"))
    assert method is None
    return body


@given(wire_values)
def test_parse_round_trips_what_xmlrpc_client_writes(value):
    assert rpc.parse_call(call("VDI.stat", value)) == ("VDI.stat", [value])


def test_parse_a_typical_request():
    req = call("VDI.create", {"dbg": "d", "sr": "s", "vdi_info": {"virtual_size": 10}})
    assert rpc.parse_call(req) == (
        "VDI.create",
        [{"dbg": "d", "sr": "s", "vdi_info": {"virtual_size": 10}}],
    )


def test_parse_accepts_i8_i4_int_and_string_integers():
    req = (
        b"<methodCall><methodName>m</methodName><params>"
        b"<param><value><i8>1099511627776</i8></value></param>"
        b"<param><value><i4>-3</i4></value></param>"
        b"<param><value><int> 7 </int></value></param>"
        b"<param><value><string>42</string></value></param>"
        b"</params></methodCall>"
    )
    assert rpc.parse_call(req) == ("m", [2**40, -3, 7, "42"])


def test_parse_scalars():
    req = (
        b"<?xml version='1.0'?><methodCall><methodName>m</methodName><params>"
        b"<param><value>bare text</value></param>"
        b"<param><value><string/></value></param>"
        b"<param><value/></param>"
        b"<param><value><boolean>1</boolean></value></param>"
        b"<param><value><boolean>0</boolean></value></param>"
        b"<param><value><double>1.5</double></value></param>"
        b"<param><value><nil/></value></param>"
        b"<param><value><base64>aGVsbG8=</base64></value></param>"
        b"<param><value><dateTime.iso8601>20261125T16:00:00</dateTime.iso8601></value></param>"
        b"<param><value><string>a &amp; b &lt;c&gt; &#233;&#x263a;</string></value></param>"
        b"<param><value><array><data/></array></value></param>"
        b"<param><value><struct/></value></param>"
        b"</params></methodCall>"
    )
    assert rpc.parse_call(req)[1] == [
        "bare text",
        "",
        "",
        True,
        False,
        1.5,
        None,
        b"hello",
        "20261125T16:00:00",
        "a & b <c> \u00e9\u263a",
        [],
        {},
    ]


def test_parse_without_params():
    assert rpc.parse_call(
        b"<methodCall><methodName>SR.ls</methodName></methodCall>"
    ) == (
        "SR.ls",
        [],
    )


def test_parse_other_encodings():
    req = "<?xml version='1.0' encoding='ISO-8859-1'?><methodCall><methodName>m</methodName>"
    req += "<params><param><value>caf\u00e9</value></param></params></methodCall>"
    assert rpc.parse_call(req.encode("latin-1"))[1] == ["caf\u00e9"]


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<methodCall><methodName>&lol9;</methodName></methodCall>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>m</methodName><params><param><value>&xxe;</value></param></params>
</methodCall>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY % p SYSTEM "http://127.0.0.1:1/evil.dtd"> %p;]>
<methodCall><methodName>m</methodName></methodCall>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE methodCall SYSTEM "file:///etc/passwd">
<methodCall><methodName>m</methodName></methodCall>"""


@pytest.mark.parametrize(
    "doc", [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY, EXTERNAL_DTD]
)
def test_doctype_and_entities_are_refused(doc):
    with pytest.raises(
        InvalidRequest, match="DOCTYPE and entity declarations are not allowed"
    ):
        rpc.parse_call(doc)


def test_undeclared_entity_is_not_well_formed():
    with pytest.raises(InvalidRequest, match="not well-formed XML: undefined entity"):
        rpc.parse_call(b"<methodCall><methodName>&x;</methodName></methodCall>")


def _one(param: bytes) -> bytes:
    """A methodCall of method m with this one <param> content."""
    return (
        b"<methodCall><methodName>m</methodName><params><param>%s</param></params></methodCall>"
        % param
    )


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"not xml", "not well-formed XML"),
        (
            b"<methodCall><methodName>m</methodName>",
            "not well-formed XML: no element found",
        ),
        (b"<a/>", "unexpected element <a> as the document element"),
        (
            b"<methodResponse><params/></methodResponse>",
            "a <methodResponse>, not a <methodCall>",
        ),
        (b"<methodCall><params/></methodCall>", "no <methodName>"),
        (
            b"<methodCall><methodName> </methodName></methodCall>",
            "<methodName> is empty",
        ),
        (
            b"<methodCall><methodName>m</methodName><params><value>1</value></params></methodCall>",
            "unexpected element <value> inside <params>",
        ),
        (
            _one(b"<value><i4>1</i4><i4>2</i4></value>"),
            "more than one value",
        ),
        (
            _one(b"<value><i4>x</i4></value>"),
            "<i4> holds 'x', not an integer",
        ),
        (
            _one(b"<value><boolean>2</boolean></value>"),
            "not 0 or 1",
        ),
        (
            _one(b"<value><double>z</double></value>"),
            "not a number",
        ),
        (
            _one(b"<value><struct><member><value>1</value></member></struct></value>"),
            "no <name> before its <value>",
        ),
        (
            _one(b"<value><struct><member><name>k</name></member></struct></value>"),
            "member 'k' has no <value>",
        ),
        (
            b"<methodCall><methodName>\xff\xfe</methodName></methodCall>",
            "not well-formed XML",
        ),
    ],
)
def test_malformed_requests_say_what_is_wrong(doc, problem):
    with pytest.raises(InvalidRequest) as e:
        rpc.parse_call(doc)
    assert problem in str(e.value)


def test_request_size_limit():
    big = "x" * (rpc.MAX_REQUEST + 1)
    with pytest.raises(InvalidRequest, match="larger than"):
        rpc.parse_call(call("m", big))
    # just under the limit is fine
    ok = "x" * (rpc.MAX_REQUEST - 200)
    assert rpc.parse_call(call("m", ok))[1] == [ok]


def test_nesting_limit():
    deep = "<value><array><data>" * (rpc.MAX_DEPTH + 5) + "<value>1</value>"
    deep += "</data></array></value>" * (rpc.MAX_DEPTH + 5)
    doc = f"<methodCall><methodName>m</methodName><params><param>{deep}</param></params></methodCall>"
    with pytest.raises(InvalidRequest, match="nested deeper"):
        rpc.parse_call(doc.encode())


# --- responses -------------------------------------------------------------------


def test_success_int64_is_always_i8():
    out = rpc.success(5, api.INT64)
    assert b"<i8>5</i8>" in out
    assert loads(out) == {"Status": "Success", "Value": 5}
    assert loads(rpc.success(2**62, api.INT64))["Value"] == 2**62


def test_success_vdi_info_marshals_fields_by_type():
    info = api.VDI_INFO.convert({"vdi": "v", "virtual_size": 1 << 40}, "x")
    out = rpc.success(info, api.VDI_INFO)
    assert b"<name>virtual_size</name><value><i8>1099511627776</i8>" in out
    assert b"<name>physical_utilisation</name><value><i8>0</i8>" in out
    assert b"<name>persistent</name><value><boolean>1</boolean>" in out
    assert loads(out)["Value"] == info


def test_success_vdi_info_list_and_query_result():
    infos = [
        api.VDI_INFO.convert({"vdi": f"v{i}", "virtual_size": i << 33}, "x")
        for i in range(3)
    ]
    assert loads(rpc.success(infos, api.VDI_INFO_LIST))["Value"] == infos
    q = api.QUERY_RESULT.convert({"driver": "ext", "features": ["A", "B"]}, "x")
    assert loads(rpc.success(q, api.QUERY_RESULT))["Value"] == q


def test_success_checks_the_value_as_it_marshals_it():
    """As Type.convert then marshalling would, in one pass: fields in the
    type's order, missing ones defaulted, unknown ones left out, strings
    escaped, and a value of the wrong type refused."""
    raw = {"extra": 1, "virtual_size": "5", "vdi": "v", "name_label": "a<b&\u00e9>", "read_only": True}
    checked = api.VDI_INFO.convert(raw, "x")
    assert rpc.success(raw, api.VDI_INFO) == rpc.success(checked, api.VDI_INFO)
    assert loads(rpc.success([raw, checked], api.VDI_INFO_LIST))["Value"] == [checked, checked]
    bad_items = [
        {"vdi": "v", "virtual_size": "big"},
        {"vdi": "v", "persistent": 1},
        {"vdi": "v", "virtual_size": 2**63},
        {"vdi": "v", "sm_config": {"a": 1}},
        {"vdi": "v", "name_label": None},
        "not a struct",
    ]
    for bad in bad_items:
        with pytest.raises(InvalidRequest):
            api.VDI_INFO_LIST.convert([bad], "x")
        with pytest.raises(InvalidRequest):
            rpc.success([checked, bad], api.VDI_INFO_LIST)


def test_unit_is_nil():
    out = rpc.success(None, api.UNIT)
    assert b"<nil/>" in out
    assert loads(out) == {"Status": "Success", "Value": None}


def test_any_marshals_by_python_type():
    value = {
        "n": 1 << 40,
        "b": True,
        "s": "x",
        "l": [1, None],
        "f": 0.5,
        "raw": b"\x00\xff",
    }
    out = loads(rpc.success(value, api.ANY))["Value"]
    assert out["n"] == 1 << 40 and out["b"] is True and out["l"] == [1, None]
    assert out["raw"].data == b"\x00\xff"


def test_failure_is_a_flat_string_list():
    out = rpc.failure(["Backend_error", "CODE", "detail"])
    assert loads(out) == {
        "Status": "Failure",
        "ErrorDescription": ["Backend_error", "CODE", "detail"],
    }


NASTY = "a&b<c>d\"e'f\r\ng\tz]]>\x00\x01\x1b\ufffe\udc80 \u263a \U0001f600"


def test_strings_are_escaped_and_always_well_formed():
    out = rpc.success({"vdi": NASTY, "sm_config": {NASTY: NASTY}}, api.VDI_INFO)
    expat.ParserCreate().Parse(out, True)  # well-formed
    value = loads(out)["Value"]
    expected = "a&b<c>d\"e'f\r\ng\tz]]>\ufffd\ufffd\ufffd\ufffd? \u263a \U0001f600"
    assert value["vdi"] == expected  # \r survives; what XML cannot carry is replaced
    assert value["sm_config"] == {expected: expected}
    assert loads(rpc.failure([NASTY]))["ErrorDescription"] == [expected]


def test_non_utf8_bytes_from_the_request_do_not_break_the_response():
    text = b"caf\xe9".decode("utf-8", "surrogateescape")
    out = rpc.failure(["Backend_error", "X", text])
    assert loads(out)["ErrorDescription"][2] == "caf?"


def test_large_response():
    infos = [
        api.VDI_INFO.convert({"vdi": f"v{i}", "name_label": "x" * 100}, "x")
        for i in range(2000)
    ]
    assert len(loads(rpc.success(infos, api.VDI_INFO_LIST))["Value"]) == 2000


@given(st.dictionaries(xml_text, wire_values, max_size=5))
def test_dumps_call_round_trips_through_xmlrpc_client(params):
    (back,), method = xmlrpc.client.loads(rpc.dumps_call("VDI.stat", params).decode())
    assert method == "VDI.stat" and back == params
    assert rpc.parse_call(rpc.dumps_call("VDI.stat", params)) == ("VDI.stat", [params])
