"""smctl's pure parts: argument building, error lines, tables (sizes: test_sizes)."""

from __future__ import annotations

from dispatcher import smctl, smctl_show


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
    assert call("vdi-copy", "s", "v", "--dest", "d")[1] == {
        "dbg": "dbg1", "sr": "s", "vdi": "v", "url": "", "dest": "d",
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
            argv += ["--dest", "d"]
        got, args = call(*argv)
        assert got == method and args["dbg"] == "dbg1"


def test_vdi_copy_remote_is_not_the_dispatcher_url() -> None:
    """The dispatcher's --url and the copy's remote are two different things."""
    argv = ["--url", "http://127.0.0.1:1/", "vdi-copy", "s", "v", "--dest", "d",
            "--remote", "http://host2:8089/"]  # fmt: skip
    ns = smctl.build_parser().parse_args(argv)
    assert ns.url == "http://127.0.0.1:1/"
    assert smctl.build_call(ns, "dbg1")[1]["url"] == "http://host2:8089/"


def test_explain() -> None:
    assert smctl_show.explain(["Sr_not_attached", "s1"]) == (
        "Sr_not_attached: SR s1 is not attached",
        ["attach it first: smctl sr-attach s1 --type TYPE --path DIR (or -o KEY=VALUE)"],
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
