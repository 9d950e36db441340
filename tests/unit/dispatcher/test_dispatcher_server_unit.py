"""sm-dispatcher's command line and log-line hygiene (no daemon started)."""

from __future__ import annotations

import pytest

from dispatcher import httpd, server


def test_defaults() -> None:
    a = server.parse_args([])
    assert (a.timeout, a.workers, a.queue_timeout, a.max_body) == (
        300.0,
        16,
        60.0,
        4 << 20,
    )
    assert a.tcp is None and not a.no_socket


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--no-socket"], "--no-socket needs --tcp"),
        (["--tcp", "host:port"], "expected [HOST:]PORT"),
        (["--tcp", "70000"], "expected [HOST:]PORT"),
        (["--timeout", "0"], "--timeout must be positive"),
        (["--workers", "0"], "at least 1"),
        (["--insecure"], "--insecure applies to --tcp only"),
        (["--request-timeout", "0"], "--request-timeout must be positive"),
        (["--max-inflight", "10"], "--max-inflight must be at least --max-body"),
    ],
)
def test_bad_options_are_usage_errors(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        server.parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_log_fields_cannot_forge_lines() -> None:
    assert (
        httpd.clean("a\nmethod=x outcome=Success")
        == "a\\nmethod=x\\x20outcome=Success"
    )
    assert httpd.clean("é") == "\\xe9"
    assert len(httpd.clean("x" * 10_000)) == 203
