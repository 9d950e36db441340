"""Sizes for people: the project's one parser and one formatter.

- ``parse("10G")`` -> 10737418240.  A size is a whole number of bytes, or a
  number with a unit K, M, G, T or P (powers of 1024; ``10GiB`` and ``10GB``
  mean the same, as in qemu-img and vhd-util), e.g. ``512M``, ``1.5G``.
  Anything else, a negative size, or a fraction of a byte is a ``SizeError``
  (an ``InvalidRequest``) that says what a size looks like.
- ``format(n)`` -> ``"10G"``, ``"1.5M"``, ``"512.1M"``; below 1 KiB the
  bytes as they are.  Tables, ``vhd info`` and diagnostics all show sizes
  this way (with the exact bytes beside it where a person may need them).
- ``arg``: argparse's ``type=`` for a size; ``join_option_values(argv, options)``: lets argparse take ``--size -5G``
  (it would read ``-5G`` as an option) so the size parser can refuse it.
"""

from __future__ import annotations

import re

from smcommon.errors import InvalidRequest

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
HELP = "bytes, or a number with K, M, G, T or P (powers of 1024), e.g. 512M, 10G, 1.5T"


class SizeError(InvalidRequest):
    msg = "{self.reason}"


def parse(text: str | int, what: str = "size") -> int:
    """The bytes ``text`` names (see the module docstring)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise SizeError(f"{what} {text} is negative")
        return text
    if not isinstance(text, str):
        raise SizeError(f"{what} {text!r} is not a size: give {HELP}")
    m = _SIZE.fullmatch(text)
    if m is None:
        raise SizeError(f"{what} {text.strip()[:40]!r} is not a size: give {HELP}")
    sign, number, unit = m.groups()
    if sign:
        raise SizeError(f"{what} {text.strip()!r} is negative")
    scale = UNITS[unit.upper()] if unit else 1
    if number.isdigit():
        return int(number) * scale
    value = float(number) * scale
    if value != int(value):
        raise SizeError(f"{what} {text.strip()!r} is not a whole number of bytes")
    return int(value)


_SIZE = re.compile(r"\s*(-?)(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGTP])(?:i?B)?)?\s*", re.IGNORECASE)


def format(n: object) -> str:
    """10737418240 -> 10G; 1572864 -> 1.5M; below 1K the bytes as they are."""
    if not isinstance(n, int) or isinstance(n, bool):
        return str(n)
    for unit in ("P", "T", "G", "M", "K"):
        if abs(n) >= UNITS[unit]:
            return f"{n / UNITS[unit]:.1f}".removesuffix(".0") + unit
    return str(n)


def arg(text: str) -> int:
    """argparse's ``type=`` for a size: the bytes, or argparse's own error."""
    import argparse

    try:
        return parse(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(e.reason) from None


def join_option_values(argv: list[str], options: set[str]) -> list[str]:
    """``[--size, -5G]`` -> ``[--size=-5G]`` for the given options."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in options and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{word}={argv[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out
