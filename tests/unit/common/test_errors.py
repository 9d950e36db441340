from __future__ import annotations

import pytest
from smcommon import errors


@pytest.mark.parametrize(
    "exc, wire",
    [
        (errors.SrNotAttached("s1"), ["Sr_not_attached", "s1"]),
        (errors.SrAttached("s1"), ["Sr_attached", "s1"]),
        (errors.VdiDoesNotExist("v1"), ["Vdi_does_not_exist", "v1"]),
        (
            errors.IllegalTransition("Detached", "Activated(RW)"),
            ["Illegal_transition", "Detached", "Activated(RW)"],
        ),
        (errors.BackendError("DISK_FULL", ["a", "b"]), ["Backend_error", "DISK_FULL", "a", "b"]),
        (errors.Unimplemented("VDI.copy"), ["Unimplemented", "VDI.copy"]),
        (errors.DoesNotExist("dp", "x"), ["Does_not_exist", "dp", "x"]),
        (errors.Cancelled("t1"), ["Cancelled", "t1"]),
        (errors.Redirect("10.0.0.1"), ["Redirect", "10.0.0.1"]),
    ],
)
def test_smapi_errors_on_the_wire(exc: errors.SmapiError, wire: list[str]) -> None:
    assert errors.to_wire(exc) == wire
    assert str(exc)  # a readable message, never empty


def test_library_error_becomes_backend_error_with_its_code() -> None:
    exc = errors.CommandError(["mkfs.ext4", "/dev/loop9"], 1, "", "mkfs.ext4: No such device\n")
    assert errors.to_wire(exc) == [
        "Backend_error",
        "COMMAND_FAILED",
        "command mkfs.ext4 /dev/loop9 failed with exit code 1: mkfs.ext4: No such device",
    ]
    assert errors.to_wire(errors.LockTimeout("sr-1", 5))[:2] == ["Backend_error", "LOCK_TIMEOUT"]
    assert errors.to_wire(errors.InvalidRequest("missing sr"))[:2] == [
        "Backend_error",
        "INVALID_REQUEST",
    ]


def test_a_bug_is_an_internal_error() -> None:
    assert errors.to_wire(KeyError("k")) == ["Backend_error", "INTERNAL_ERROR", "KeyError: 'k'"]


def test_wire_arguments_are_strings() -> None:
    exc = errors.BackendError("X", [1, 2.5])  # type: ignore[list-item]
    assert errors.to_wire(exc) == ["Backend_error", "X", "1", "2.5"]
