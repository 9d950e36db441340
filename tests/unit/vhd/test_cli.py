"""The vhd command: every subcommand, --json, sizes, errors as one line and an exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from smcommon import sizes, vhd
from smcommon.vhd import cli
from vhd_unit_helpers import MIB


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("512M", 512 * MIB),
                                             ("10G", 10 * 2**30), ("2T", 2 * 2**40),
                                             ("1k", 1024), ("3MiB", 3 * MIB)])
def test_parse_size(text: str, value: int) -> None:
    assert sizes.arg(text) == value


def test_bad_size_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["create", str(tmp_path / "a.vhd"), "ten"])
    assert exc.value.code == 2
    assert "'ten' is not a size: give bytes" in capsys.readouterr().err


def test_every_subcommand(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    rc, out, _ = run(capsys, "create", a, "10M", "--json")
    assert rc == 0 and json.loads(out)["virtual_size"] == 10 * MIB
    data = tmp_path / "in.bin"
    data.write_bytes(b"hello world")
    rc, out, _ = run(capsys, "write", a, "--offset", "1M", "--input", str(data))
    assert rc == 0 and "wrote 11 bytes" in out
    assert run(capsys, "snapshot", a, b)[0] == 0
    rc, out, _ = run(capsys, "info", b)
    assert rc == 0 and "differencing" in out and "depth" in out
    rc, out, _ = run(capsys, "read", b, "--offset", "1M", "--length", "5", "--output",
                     str(tmp_path / "o.bin"))
    assert rc == 0 and (tmp_path / "o.bin").read_bytes() == b"hello"
    rc, out, _ = run(capsys, "chain", b, "--json")
    assert len(json.loads(out)["chain"]) == 2
    rc, out, _ = run(capsys, "map", b, "--json")
    assert json.loads(out)[0] == {"offset": 0, "length": 2 * MIB, "depth": 2}  # dynamic: whole block
    rc, out, _ = run(capsys, "check", b, "--json")
    assert rc == 0 and json.loads(out) == {"problems": []}
    assert run(capsys, "set-hidden", a, "true")[0] == 0 and vhd.info(a).hidden
    assert run(capsys, "set-hidden", a, "off")[0] == 0 and not vhd.info(a).hidden
    rc, out, _ = run(capsys, "coalesce", b, "--json")
    assert rc == 0 and json.loads(out) == {"copied": 0}
    rc, out, _ = run(capsys, "resize", a, "20M", "--json")
    assert json.loads(out)["virtual_size"] == 20 * MIB
    raw = str(tmp_path / "a.raw")
    assert run(capsys, "export", a, raw)[0] == 0
    rc, out, _ = run(capsys, "import", raw, str(tmp_path / "c.vhd"), "--json")
    assert json.loads(out)["allocated_blocks"] == 1
    assert run(capsys, "convert", b, str(tmp_path / "d.vhd"))[0] == 0
    c = str(tmp_path / "c2.vhd")
    run(capsys, "convert", a, c)
    assert run(capsys, "set-parent", b, c)[0] == 0
    assert vhd.info(b).parent_uuid == vhd.info(c).uuid
    rc, out, _ = run(capsys, "repair", a)
    assert rc == 0 and "nothing to repair" in out


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = run(capsys, "info", str(tmp_path / "missing.vhd"))
    assert rc == 1 and err.count("\n") == 1 and "no such file" in err and "Traceback" not in err
    rc, _, err = run(capsys, "create", str(tmp_path / "x.vhd"), "3000G")
    assert rc == 1 and "2040 GiB" in err
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(b"\0" * 4096)
    rc, out, err = run(capsys, "check", str(junk))
    assert rc == 3 and "bad cookie" in out


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("create", "snapshot", "info", "read", "write", "set-hidden", "set-parent",
                "coalesce", "resize", "check", "repair", "export", "import", "convert", "map"):
        with pytest.raises(SystemExit) as exc:
            cli.main([sub, "--help"])
        assert exc.value.code == 0
        assert "usage: vhd " + sub in capsys.readouterr().out
