"""smcommon.sizes: the one size parser and formatter, and everywhere it is used."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest
from smcommon import api, sizes
from smcommon.errors import InvalidRequest


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10G", 10 << 30),
        ("512M", 512 << 20),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        ("2TiB", 2 << 40),
        ("2tb", 2 << 40),
        ("1k", 1024),
        (" 7 K ", 7 << 10),
        (".5M", 1 << 19),
        ("0", 0),
        (12, 12),
    ],
)
def test_parse(text: str | int, value: int) -> None:
    assert sizes.parse(text) == value


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "is not a size: give bytes, or a number with K, M, G, T or P"),
        ("G", "is not a size"),
        ("10X", "'10X' is not a size"),
        ("-5G", "'-5G' is negative"),
        (-1, "-1 is negative"),
        ("1.3", "not a whole number of bytes"),
        ("1.3K", "not a whole number of bytes"),
        (True, "is not a size"),
    ],
)
def test_parse_refuses_and_says_what_a_size_is(text: object, words: str) -> None:
    with pytest.raises(sizes.SizeError) as e:
        sizes.parse(text, "virtual_size")  # type: ignore[arg-type]
    assert words in str(e.value) and "virtual_size" in str(e.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [(10 << 30, "10G"), (3 << 19, "1.5M"), (537005056, "512.1M"), (0, "0"),
     (1023, "1023"), ("x", "x")],
)  # fmt: skip
def test_format(n: object, text: str) -> None:
    assert sizes.format(n) == text


def test_argparse_type_and_negative_values() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=sizes.arg)
    assert p.parse_args(sizes.join_option_values(["--size", "1G"], {"--size"})).size == 1 << 30
    err = io.StringIO()
    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "stderr", err)
        p.parse_args(sizes.join_option_values(["--size", "-5G"], {"--size"}))
    assert "'-5G' is negative" in err.getvalue()


def test_wire_int64_stays_strict() -> None:
    """The toolstack sends integers; sizes are for people (by hand, smctl, vhd)."""
    m = api.METHODS["VDI.create"]
    with pytest.raises(InvalidRequest, match="must be an int64"):
        m.validate({"dbg": "d", "sr": "s", "vdi_info": {"virtual_size": "10G"}})


def test_smctl_negative_size_is_refused_by_the_size_parser() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dispatcher.smctl", "--direct", "vdi-create", "s",
         "--name", "d", "--size", "-5G"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert "'-5G' is negative" in r.stderr and "expected one argument" not in r.stderr
