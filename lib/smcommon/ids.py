"""Random (RFC 4122 version 4) UUIDs, without the ``uuid`` module.

``import uuid`` (which imports ``platform``) costs each plugin process about
6 ms; the storage manager only ever needs new random ids.
"""

from __future__ import annotations

import os


def new_bytes() -> bytes:
    """16 random bytes with the version 4 / RFC 4122 variant bits set."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return bytes(b)


def new() -> str:
    """A new id in the usual text form (``str(uuid.uuid4())``)."""
    h = new_bytes().hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
