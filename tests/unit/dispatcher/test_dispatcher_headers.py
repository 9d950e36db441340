"""dispatcher.httpd.read_headers: a request's header fields, as http.client's
parser (email.message.Message) gives them, and its limits."""

from __future__ import annotations

import io

import pytest

from dispatcher.httpd import MAX_HEADER_LINE, MAX_HEADERS, BadHeaders, read_headers


def fields(raw: bytes) -> object:
    return read_headers(io.BytesIO(raw))


def test_fields_by_name_in_any_case_the_first_of_a_name() -> None:
    h = fields(
        b"Host: localhost\r\ncontent-LENGTH:  42 \r\nX-A: 1\r\nx-a: 2\r\n"
        b"X-Folded: one\r\n\t two\r\n\r\nBODY"
    )
    assert h.get("Content-Length") == "42"  # type: ignore[attr-defined]
    assert h.get("CONTENT-length") == "42"  # type: ignore[attr-defined]
    assert h.get("X-A") == "1"  # type: ignore[attr-defined]
    assert h.get("x-folded") == "one two"  # type: ignore[attr-defined]
    assert h.get("Transfer-Encoding", "") == ""  # type: ignore[attr-defined]
    assert h.get("Missing") is None  # type: ignore[attr-defined]


def test_the_body_is_left_unread() -> None:
    stream = io.BytesIO(b"A: 1\n\nBODY")
    read_headers(stream)
    assert stream.read() == b"BODY"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"A: " + b"x" * MAX_HEADER_LINE + b"\r\n\r\n", 431),
        (b"".join(b"H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", 431),
        (b"no colon here\r\n\r\n", 400),
        (b": no name\r\n\r\n", 400),
    ],
)
def test_what_is_no_header_is_refused(raw: bytes, code: int) -> None:
    with pytest.raises(BadHeaders) as e:
        fields(raw)
    assert e.value.code == code
