"""dispatcher.wire: the safe parser and the int64-aware marshalling."""

from __future__ import annotations

import xmlrpc.client

import pytest

from dispatcher import wire


def test_call_round_trip_with_int64() -> None:
    args = {
        "dbg": "d",
        "sr": "s",
        "vdi_info": {"virtual_size": 10 << 30, "n": 5, "ro": True},
    }
    body = wire.dumps_call("VDI.create", args)
    assert b"<i8>10737418240</i8>" in body
    assert b"<int>5</int>" in body
    call = wire.parse_call(body)
    assert call.method == "VDI.create"
    assert call.arg == args
    # the standard library reads it too
    assert xmlrpc.client.loads(body) == ((args,), "VDI.create")


def test_response_parse_and_outcome() -> None:
    ok = wire.parse_response(wire.dumps_response(wire.success(["a"])))
    assert (
        ok.status == "Success"
        and ok.value["Value"] == ["a"]
        and ok.outcome == "Success"
    )
    bad = wire.parse_response(
        wire.dumps_response(wire.failure(["Backend_error", "X", "detail"]))
    )
    assert bad.status == "Failure" and bad.error == ["Backend_error", "X", "detail"]
    assert bad.outcome == "Backend_error:X"
    fault = wire.parse_response(wire.dumps_fault(-32700, "nope"))
    assert fault.fault == (-32700, "nope") and fault.outcome == "Fault:-32700"
    other = wire.parse_response(
        xmlrpc.client.dumps(("x",), methodresponse=True).encode()
    )
    assert other.status == "Other"


def test_nil_values_are_read() -> None:
    body = xmlrpc.client.dumps(
        ({"Status": "Success", "Value": None},), methodresponse=True, allow_none=True
    )
    assert wire.parse_response(body.encode()).value == {
        "Status": "Success",
        "Value": None,
    }


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"", wire.FAULT_PARSE, "empty"),
        (b"   \n", wire.FAULT_PARSE, "empty"),
        (b"hello", wire.FAULT_PARSE, "not well-formed"),
        (
            b"<methodCall><methodName>x</methodName>",
            wire.FAULT_PARSE,
            "not well-formed",
        ),
        (
            b"<methodResponse><params></params></methodResponse>",
            wire.FAULT_INVALID,
            "not a <methodCall>",
        ),
        (
            b"<methodCall><params></params></methodCall>",
            wire.FAULT_INVALID,
            "no <methodName>",
        ),
        (
            (
                b"<methodCall><methodName>a</methodName><params><param><value><int>zz</int></value>"
                b"</param></params></methodCall>"
            ),
            wire.FAULT_INVALID,
            "<int> holds 'zz', not an integer",
        ),
        (  # a <member> without a <name>
            (
                b"<methodCall><methodName>a</methodName><params><param><value><struct>"
                b"<member><value><int>1</int></value></member>"
                b"</struct></value></param></params></methodCall>"
            ),
            wire.FAULT_INVALID,
            "struct member has no <name>",
        ),
        (
            b"<methodCall><methodName>&x;</methodName><params/></methodCall>",
            wire.FAULT_PARSE,
            "undefined entity",
        ),
    ],
)
def test_bad_requests_name_the_problem(body: bytes, code: int, words: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.parse_call(body)
    assert e.value.fault_code == code
    assert words in str(e.value)


@pytest.mark.parametrize(
    "body",
    [
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "c">]><methodCall><methodName>&b;</methodName></methodCall>',
        b'<!DOCTYPE a SYSTEM "file:///etc/passwd"><methodCall><methodName>a</methodName></methodCall>',
        b'<!DOCTYPE a [<!ENTITY % p SYSTEM "http://example.invalid/x">%p;]><methodCall/>',
        b"<!DOCTYPE a><methodCall><methodName>a</methodName><params/></methodCall>",
    ],
)
def test_dtds_are_refused_before_expansion(body: bytes) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.parse_call(body)
    assert e.value.fault_code == wire.FAULT_UNSAFE
    assert "DTDs and entities are not accepted" in str(e.value)


def test_billion_laughs_costs_nothing() -> None:
    ents = "".join(
        f'<!ENTITY l{i} "{f"&l{i - 1};" * 10 if i else "lol"}">' for i in range(12)
    )
    body = f"<!DOCTYPE x [{ents}]><methodCall><methodName>&l11;</methodName></methodCall>".encode()
    with pytest.raises(wire.WireError) as e:
        wire.parse_call(body)
    assert e.value.fault_code == wire.FAULT_UNSAFE


def test_response_must_hold_one_value() -> None:
    params = xmlrpc.client.dumps((1, 2))
    body = f"<?xml version='1.0'?><methodResponse>{params}</methodResponse>".encode()
    with pytest.raises(wire.WireError, match="holds 2 values"):
        wire.parse_response(body)
