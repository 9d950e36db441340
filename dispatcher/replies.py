"""The dispatcher's own answers, and reading a plugin's: small helpers over ``wire``."""

from __future__ import annotations

from dispatcher import wire


def fail(*description: str) -> bytes:
    """A Failure response with this ErrorDescription."""
    return wire.dumps_response(wire.failure(list(description)))


def backend(code: str, *details: str) -> bytes:
    """``Backend_error <code> <details...>``."""
    return fail("Backend_error", code, *details)


def parse_or_none(out: bytes) -> wire.Response | None:
    try:
        return wire.parse_response(out)
    except wire.WireError:
        return None


def describe(out: bytes, resp: wire.Response | None) -> list[str]:
    """What a failed plugin answer says, in words."""
    if resp is not None and resp.fault is not None:
        return [f"fault {resp.fault[0]}: {resp.fault[1]}"]
    if resp is not None:
        return resp.error
    try:
        return wire.parse_response(out).error
    except wire.WireError:
        return ["(no response)"]


def outcome(out: bytes) -> str:
    """One word for the log line of a response."""
    try:
        return wire.parse_response(out).outcome
    except wire.WireError:
        return "Invalid"
