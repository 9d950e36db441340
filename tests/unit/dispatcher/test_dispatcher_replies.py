"""dispatcher.replies.judge: a Success answer whose value is not needed is
checked, not parsed (a large one as it arrives); anything else is parsed.  ``Judge`` fed in pieces, as a plugin's answer
arrives, says what ``judge`` says of the whole."""

from __future__ import annotations

import pytest
from smcommon import rpc

from dispatcher import wire
from dispatcher.replies import CHECK_AS_IT_ARRIVES, Judge, judge

BIG = [{"vdi": f"v{i}", "name_label": "x" * 40, "virtual_size": 1 << 33} for i in range(4000)]


def fed(body: bytes, need_value: bool = False, piece: int = 65536) -> wire.Response:
    """``Judge`` fed ``body`` in pieces, as ``Child`` feeds it."""
    j = Judge(need_value)
    out = bytearray()
    for i in range(0, len(body), piece):
        out += body[i : i + piece]
        j.feed(body[i : i + piece], out)
    return j.result(bytes(out))


def test_a_large_success_is_checked_not_built() -> None:
    body = rpc.success(BIG)
    assert len(body) > CHECK_AS_IT_ARRIVES
    for r in (judge(body, need_value=False), fed(body), fed(body, piece=1000)):
        assert r.status == "Success" and r.value == {"Status": "Success"}
    # when the value is needed, it is built
    full = judge(body, need_value=True)
    assert full.value["Value"][3999]["vdi"] == "v3999"


def test_a_large_answer_that_is_not_sound_is_refused() -> None:
    body = rpc.success(BIG)
    with pytest.raises(wire.WireError, match="not well-formed"):
        judge(body[: len(body) // 2], need_value=False)
    with pytest.raises(wire.WireError, match="not well-formed"):
        fed(body[: len(body) // 2])
    with pytest.raises(wire.WireError, match="not well-formed"):
        fed(body[:300000] + b"<<" + body[300000:])
    with pytest.raises(wire.WireError):
        judge(body.replace(b"<struct>", b"<struct>" + b" " * 10 + b"<!-- x -->", 1).replace(
            b"</methodResponse>", b"</methodResponse><extra/>"
        ), need_value=False)
    head, _, tail = body.partition(b"\n")
    dtd = head + b'\n<!DOCTYPE methodResponse [<!ENTITY a "aaaa">]>\n' + tail
    for check in (lambda: judge(dtd, need_value=False), lambda: fed(dtd)):
        with pytest.raises(wire.WireError) as e:
            check()
        assert e.value.fault_code in (wire.FAULT_UNSAFE, wire.FAULT_PARSE)


def test_failures_are_parsed() -> None:
    fail = rpc.failure(["Backend_error", "X", "y" * (CHECK_AS_IT_ARRIVES + 10)])
    r = judge(fail, need_value=False)
    assert r.status == "Failure" and r.error[:2] == ["Backend_error", "X"]
    assert fed(fail).error[:2] == ["Backend_error", "X"]
    small = rpc.failure(["VDI_DOES_NOT_EXIST", "v"])
    assert judge(small, need_value=False).error == ["VDI_DOES_NOT_EXIST", "v"]
    assert fed(rpc.dumps_fault(-32700, "bad")).fault == (-32700, "bad")


def test_a_small_success_is_checked_or_built_as_asked() -> None:
    small = rpc.success({"vdi": "v"})
    for r in (judge(small, need_value=False), fed(small)):
        assert r.status == "Success" and r.value == {"Status": "Success"}
    assert judge(small, need_value=True).value["Value"] == {"vdi": "v"}
    assert fed(small, need_value=True).value["Value"] == {"vdi": "v"}
    assert fed(rpc.success(BIG), need_value=True).value["Value"][3999]["vdi"] == "v3999"
    # checked: cut short, or with a DTD, it is refused as a large one is
    with pytest.raises(wire.WireError, match="not well-formed"):
        judge(small[:-20], need_value=False)
    head, _, tail = small.partition(b"\n")
    with pytest.raises(wire.WireError):
        judge(head + b'\n<!DOCTYPE methodResponse [<!ENTITY a "a">]>\n' + tail, need_value=False)
