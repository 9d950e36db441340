"""smcommon.lvm against real lvm2 outputs (tests/data/captures/lvm, taken with
device-mapper on a full kernel), replayed by a fake runner that checks each argv.

Where this module's argv differs from the captured one (it adds ``-an -Zn``,
``-f``, more report fields), the test names the argv this module builds and
replays the real output of the closest captured command: what is tested is
the parsing and the error mapping of real lvm text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from replay import Replay, load
from smcommon.lvm import (
    ECMD_FAILED,
    LV_FIELDS,
    REPORT_FIELDS,
    VG_FIELDS,
    Lvm,
    LvmConfig,
    LvmError,
    parse_lvs,
    parse_report,
)

VG = "VG_XenStorage-f140ab92-e742-4921-aff5-d7ad76cd5e9e"
LV1 = "VHD-61412ba9-e3e7-43bb-b839-0946955542c3"
LV2 = "VHD-3208e8b7-6dce-45f7-a78e-51673d1f2517"
MiB = 1024 * 1024


def lvm_with(tmp_path: Path, *script: tuple[list[str], str]) -> tuple[Lvm, Replay]:
    replay = Replay([(argv, load("lvm", case)) for argv, case in script])
    cfg = LvmConfig(tmp_path / "lvm", ["/dev/sda"], activation=True)
    return Lvm(cfg, replay), replay


def test_every_command_gets_the_private_configuration_and_a_timeout(tmp_path: Path) -> None:
    lvm, replay = lvm_with(tmp_path, (["pvcreate", "-ff", "-y", "/dev/sda"], "pvcreate"))
    lvm.pvcreate("/dev/sda")
    replay.done()
    call = replay.calls[0]
    assert call["env"]["LVM_SYSTEM_DIR"] == str(tmp_path / "lvm")
    assert call["env"]["LVM_SUPPRESS_FD_WARNINGS"] == "1"
    assert call["timeout"] > 0
    conf = (tmp_path / "lvm" / "lvm.conf").read_text()
    assert 'global_filter = [ "a|^/dev/sda$|", "r|.*|" ]' in conf
    assert "activation = 1" in conf and "use_devicesfile = 0" in conf
    assert f'locking_dir = "{tmp_path / "lvm" / "lock"}"' in conf
    assert lvm.calls == 1


def test_the_filter_admits_only_the_lun_and_activation_can_be_off(tmp_path: Path) -> None:
    cfg = LvmConfig(tmp_path, ["/dev/loop7"], activation=False)
    text = cfg.text()
    assert 'global_filter = [ "a|^/dev/loop7$|", "r|.*|" ]' in text
    assert "activation = 0" in text
    assert "udev_sync = 0" in text


def test_vg_and_lv_creation_argv(tmp_path: Path) -> None:
    lvm, replay = lvm_with(
        tmp_path,
        (["vgcreate", VG, "/dev/sda"], "vgcreate"),
        (["lvcreate", "-n", "LV-86bb85ed-9dba-426a-9868-2a47e6a251f6", "-L", "32M", "-an",
          "-Zn", VG], "lvcreate_inactive_zero_n"),
        (["lvcreate", "-n", LV1, "-L", "8M", "-an", "-Zn", "--addtag", "vdi_type=vhd",
          "--alloc", "contiguous", VG], "lvcreate"),
    )
    lvm.vgcreate(VG, "/dev/sda")
    lvm.lvcreate(VG, "LV-86bb85ed-9dba-426a-9868-2a47e6a251f6", 32 * MiB)
    lvm.lvcreate(VG, LV1, 8 * MiB, tags=["vdi_type=vhd"], contiguous=True)
    replay.done()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("lvcreate_already_exists", "LVM_EXISTS"),
        ("lvcreate_insufficient_space", "LVM_NO_SPACE"),
        ("lvcreate_nonexistent_vg", "LVM_VG_NOT_FOUND"),
    ],
)
def test_lvcreate_failures_are_named(tmp_path: Path, case: str, code: str) -> None:
    argv = ["lvcreate", "-n", LV1, "-L", "8M", "-an", "-Zn", VG]
    lvm, _replay = lvm_with(tmp_path, (argv, case))
    with pytest.raises(LvmError) as exc:
        lvm.lvcreate(VG, LV1, 8 * MiB)
    assert exc.value.code == code
    assert exc.value.details[0] == f"lvcreate {VG}/{LV1}"
    assert load("lvm", case).exit == ECMD_FAILED
    # the real message is kept, one line
    assert load("lvm", case).stderr.strip().splitlines()[0].strip() in exc.value.details[1]


def test_vgcreate_of_an_existing_vg(tmp_path: Path) -> None:
    lvm, _ = lvm_with(tmp_path, (["vgcreate", VG, "/dev/sda"], "vgcreate_already_exists"))
    with pytest.raises(LvmError) as exc:
        lvm.vgcreate(VG, "/dev/sda")
    assert exc.value.code == "LVM_EXISTS"


def test_lvremove_rename_tags_activation(tmp_path: Path) -> None:
    lvm, replay = lvm_with(
        tmp_path,
        (["lvremove", "-f", f"{VG}/{LV1}"], "lvremove_f"),
        (["lvremove", "-f", f"{VG}/{LV1}"], "lvremove_f_nonexistent"),
        (["lvrename", VG, LV2, LV2 + "-renamed"], "lvrename"),
        (["lvchange", "--addtag", "hidden", f"{VG}/{LV1}"], "lvchange_addtag"),
        (["lvchange", "--deltag", "hidden", f"{VG}/{LV1}"], "lvchange_deltag"),
        (["lvchange", "-ay", f"{VG}/{LV1}"], "lvchange_ay"),
        (["lvchange", "-an", f"{VG}/{LV1}"], "lvchange_an"),
    )
    assert lvm.lvremove(VG, LV1) is True
    assert lvm.lvremove(VG, LV1, missing_ok=True) is False  # exit 5, "Failed to find"
    lvm.lvrename(VG, LV2, LV2 + "-renamed")
    lvm.lv_tags(VG, LV1, add=["hidden"])
    lvm.lv_tags(VG, LV1, delete=["hidden"])
    lvm.lvchange_active(VG, LV1, True)
    lvm.lvchange_active(VG, LV1, False)
    replay.done()


def test_lvremove_of_a_volume_in_use(tmp_path: Path) -> None:
    lv = "LV-86bb85ed-9dba-426a-9868-2a47e6a251f6"
    lvm, _ = lvm_with(tmp_path, (["lvremove", "-f", f"{VG}/{lv}"], "lvremove_open_lv"))
    with pytest.raises(LvmError) as exc:
        lvm.lvremove(VG, lv, missing_ok=True)
    assert exc.value.code == "LVM_IN_USE"


def test_lvresize_grows_shrinks_and_the_same_size_is_no_error(tmp_path: Path) -> None:
    lvm, replay = lvm_with(
        tmp_path,
        (["lvresize", "-f", "-L", "16M", f"{VG}/{LV2}"], "lvextend"),
        (["lvresize", "-f", "-L", "12M", f"{VG}/{LV2}"], "lvreduce_f"),
        (["lvresize", "-f", "-L", "16M", "--alloc", "contiguous", f"{VG}/{LV2}"],
         "lvresize_same_size"),
    )
    lvm.lvresize(VG, LV2, 16 * MiB)
    lvm.lvresize(VG, LV2, 12 * MiB)
    lvm.lvresize(VG, LV2, 16 * MiB, contiguous=True)  # exit 5 "matches existing size"
    replay.done()


def test_sizes_must_be_whole_mib(tmp_path: Path) -> None:
    lvm, _ = lvm_with(tmp_path)
    with pytest.raises(ValueError):
        lvm.lvcreate(VG, LV1, 1000)


def test_lvs_report_parsed(tmp_path: Path) -> None:
    lvm, replay = lvm_with(
        tmp_path,
        (["lvs", "--reportformat", "json", "-o", LV_FIELDS, "--units", "b", "--nosuffix", VG],
         "lvs_json_vg"),
    )
    lvs = lvm.lvs(VG)
    replay.done()
    assert [lv.name for lv in lvs] == ["LV-86bb85ed-9dba-426a-9868-2a47e6a251f6", LV2, LV1]
    by = {lv.name: lv for lv in lvs}
    assert by[LV2].size == 8 * MiB and by[LV2].tags == ("hidden",)
    assert by[LV2].active and not by["LV-86bb85ed-9dba-426a-9868-2a47e6a251f6"].active
    assert by[LV1].tags == ("vdi_type=vhd",)


def test_lvs_of_a_missing_lv_or_vg(tmp_path: Path) -> None:
    argv = ["lvs", "--reportformat", "json", "-o", LV_FIELDS, "--units", "b", "--nosuffix"]
    lvm, _ = lvm_with(
        tmp_path,
        ([*argv, f"{VG}/VHD-doesnotexist"], "lvs_nonexistent_lv"),
        ([*argv, "VG_XenStorage-doesnotexist"], "vgs_nonexistent_vg"),
    )
    with pytest.raises(LvmError) as exc:
        lvm.lvs(VG, ["VHD-doesnotexist"])
    assert exc.value.code == "LVM_LV_NOT_FOUND"
    with pytest.raises(LvmError) as exc:
        lvm.lvs("VG_XenStorage-doesnotexist")
    assert exc.value.code == "LVM_VG_NOT_FOUND"


def test_vgs_and_pvs(tmp_path: Path) -> None:
    lvm, replay = lvm_with(
        tmp_path,
        (["vgs", "--reportformat", "json", "-o", VG_FIELDS, "--units", "b", "--nosuffix", VG],
         "vgs_json_one_vg"),
        (["pvs", "--reportformat", "json", "-o", "pv_name,vg_name,pv_size,pv_free,pe_start,pv_pe_count",
          "--units", "b", "--nosuffix"], "pvs_json"),
        (["vgs", "--reportformat", "json", "-o", VG_FIELDS, "--units", "b", "--nosuffix",
          "VG_XenStorage-doesnotexist"], "vgs_nonexistent_vg"),
    )
    vg = lvm.vgs(VG)
    assert (vg.size, vg.free, vg.extent_size) == (255852544, 255852544, 4 * MiB)
    (pv,) = lvm.pvs()
    assert (pv.name, pv.vg, pv.size) == ("/dev/sda", VG, 255852544)
    with pytest.raises(LvmError) as exc:
        lvm.vgs("VG_XenStorage-doesnotexist")
    assert exc.value.code == "LVM_VG_NOT_FOUND"
    replay.done()


def test_vg_and_pv_removal(tmp_path: Path) -> None:
    lvm, replay = lvm_with(
        tmp_path,
        (["vgremove", "-f", VG], "vgremove"),
        (["pvremove", "-ff", "-y", "/dev/sda"], "pvremove"),
    )
    lvm.vgremove(VG)
    lvm.pvremove("/dev/sda")
    replay.done()


def test_segments_and_the_one_report_of_a_vg() -> None:
    """The report format of a loop-activated SR (activation off, as on this
    machine): one row per segment, the VG's fields on every row."""
    out = """  {
      "report": [
          {
              "lv": [
                  {"lv_name":"MGT", "lv_size":"67108864", "lv_attr":"-wc-XX----", "lv_tags":"", "seg_start_pe":"0", "seg_size_pe":"16", "devices":"/dev/loop0(0)", "vg_name":"VG_XenStorage-x", "vg_size":"2143289344", "vg_free":"1996488704", "vg_extent_size":"4194304", "vg_tags":"sm_owner=abc,sm_host=h1"},
                  {"lv_name":"VHD-a", "lv_size":"25165824", "lv_attr":"-wc-XX----", "lv_tags":"", "seg_start_pe":"0", "seg_size_pe":"2", "devices":"/dev/loop0(16)", "vg_name":"VG_XenStorage-x", "vg_size":"2143289344", "vg_free":"1996488704", "vg_extent_size":"4194304", "vg_tags":"sm_owner=abc,sm_host=h1"},
                  {"lv_name":"VHD-a", "lv_size":"25165824", "lv_attr":"-wc-XX----", "lv_tags":"", "seg_start_pe":"2", "seg_size_pe":"4", "devices":"/dev/loop0(40)", "vg_name":"VG_XenStorage-x", "vg_size":"2143289344", "vg_free":"1996488704", "vg_extent_size":"4194304", "vg_tags":"sm_owner=abc,sm_host=h1"}
              ]
          }
      ]
  }
"""
    vg, lvs = parse_report(out, "VG_XenStorage-x")
    assert vg is not None and vg.tags == ("sm_owner=abc", "sm_host=h1")
    assert vg.extent_size == 4 * MiB and vg.free == 1996488704
    a = {lv.name: lv for lv in lvs}["VHD-a"]
    assert [(s.lv_start, s.count, s.pv, s.pv_start) for s in a.segments] == [
        (0, 2, "/dev/loop0", 16), (2, 4, "/dev/loop0", 40)]
    assert "vg_tags" in REPORT_FIELDS and "devices" in REPORT_FIELDS


def test_an_empty_and_a_garbled_report() -> None:
    assert parse_lvs(load("lvm", "lvs_json_no_lvs").stdout) == []
    with pytest.raises(LvmError) as exc:
        parse_lvs("not json")
    assert exc.value.code == "LVM_BAD_REPORT"
