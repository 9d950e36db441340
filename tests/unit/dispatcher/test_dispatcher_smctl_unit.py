"""smctl's pure parts: sizes, argument building, error lines, tables."""

from __future__ import annotations

import argparse

import pytest

from dispatcher import smctl, smctl_show


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10G", 10 << 30),
        ("512M", 512 << 20),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        ("2TiB", 2 << 40),
        ("1k", 1024),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert smctl.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "10Q", "-1G", "1.3"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        smctl.parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(10 << 30, "10G"), (3 << 19, "1.5M"), (0, "0"), (1023, "1023"), ("x", "x")],
)
def test_human_size(n: object, text: str) -> None:
    assert smctl_show.human_size(n) == text


def call(*argv: str) -> tuple[str, dict[str, object]]:
    ns = smctl.build_parser().parse_args(list(argv))
    return smctl.build_call(ns, "dbg1")


def test_vdi_create_arguments() -> None:
    method, args = call(
        "vdi-create", "sr1", "--name", "d0", "--size", "10G", "--sm-config", "a=b"
    )
    assert method == "VDI.create"
    assert args == {
        "dbg": "dbg1",
        "sr": "sr1",
        "vdi_info": {
            "name_label": "d0",
            "name_description": "",
            "ty": "user",
            "virtual_size": 10 << 30,
            "read_only": False,
            "persistent": True,
            "sm_config": {"a": "b"},
        },
    }


def test_other_commands_arguments() -> None:
    assert call("sr-create", "ext", "--path", "/srv/x", "--sr", "u1") == (
        "SR.create",
        {
            "dbg": "dbg1",
            "sr": "u1",
            "device_config": {"path": "/srv/x"},
            "physical_size": 0,
        },
    )
    assert call("vdi-attach", "s", "v", "--dp", "vm1", "--read-only")[1] == {
        "dbg": "dbg1", "sr": "s", "vdi": "v", "dp": "vm1", "read_write": False,
    }  # fmt: skip
    assert call("vdi-set-persistent", "s", "v", "false")[1]["persistent"] is False
    assert call("vdi-snapshot", "s", "v", "--name", "n")[1] == {
        "dbg": "dbg1", "sr": "s", "vdi_info": {"vdi": "v", "name_label": "n"},
    }  # fmt: skip
    assert call("vdi-copy", "s", "v", "--url", "local", "--dest", "d")[1] == {
        "dbg": "dbg1", "sr": "s", "vdi": "v", "url": "local", "dest": "d",
    }  # fmt: skip
    assert call("vdi-get-by-name", "s", "d0")[1] == {
        "dbg": "dbg1",
        "sr": "s",
        "name": "d0",
    }
    assert call("cancel", "t1") == ("Dispatcher.cancel", {"dbg": "dbg1", "task": "t1"})
    assert call("gc", "s") == ("SR.gc", {"dbg": "dbg1", "sr": "s"})
    assert call("vdi-compose", "s", "a", "b")[1] == {
        "dbg": "dbg1",
        "sr": "s",
        "vdi1": "a",
        "vdi2": "b",
    }


def test_every_command_builds() -> None:
    needs = {
        "sr": "s", "vdi": "v", "vdi1": "a", "vdi2": "b", "name": "n", "content-id": "c", "task": "t",
        "persistent": "true", "type": "ext",
    }  # fmt: skip
    for name, (method, _help, kinds) in smctl.COMMANDS.items():
        argv = [name] + [needs[k] for k in kinds if k in needs]
        if "vdi-new" in kinds:
            argv += ["--name", "x", "--size", "1M"]
        if "copy" in kinds:
            argv += ["--url", "local", "--dest", "d"]
        got, args = call(*argv)
        assert got == method and args["dbg"] == "dbg1"


def test_explain() -> None:
    assert smctl_show.explain(["Sr_not_attached", "s1"]) == (
        "Sr_not_attached: SR s1 is not attached",
        [],
    )
    assert smctl_show.explain(
        ["Backend_error", "PLUGIN_FAILED", "it failed", "tail"]
    ) == (
        "PLUGIN_FAILED: it failed",
        ["tail"],
    )
    assert smctl_show.explain(["Weird", "a", "b"]) == ("Weird: a b", [])
    assert smctl_show.explain([])[0].startswith("the call failed")


def test_vdi_table() -> None:
    text = smctl_show.vdi_table(
        [
            {
                "vdi": "v1",
                "name_label": "disk",
                "virtual_size": 1 << 30,
                "read_only": True,
            }
        ]
    )
    header, row = text.splitlines()
    assert header.split() == [
        "VDI",
        "NAME",
        "SIZE",
        "USED",
        "RO",
        "SNAPSHOT",
        "PERSISTENT",
    ]
    assert row.split()[:3] == ["v1", "disk", "1G"]
    assert row.split()[3] == "yes"  # USED is empty, RO is yes
    assert smctl_show.vdi_table([]).split() == header.split()
