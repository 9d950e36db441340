"""Helpers for the VHD unit tests: small images in tmp_path, a byte model to compare with."""

from __future__ import annotations

import random

MIB = 1024 * 1024
BLOCK = 2 * MIB


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def apply(model: bytearray, offset: int, data: bytes) -> None:
    model[offset : offset + len(data)] = data
