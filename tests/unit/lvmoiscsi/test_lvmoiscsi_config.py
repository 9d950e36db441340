"""device_config of the lvmoiscsi plugin: clear errors naming the key, never a secret."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from smcommon.errors import BackendError

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins" / "lvmoiscsi"))
import lvmoiscsi_driver as drv

SECRET = "s3cr3t-Do-Not-Show"


def bad(dc: dict[str, str]) -> str:
    with pytest.raises(BackendError) as exc:
        drv.parse_config(dc)
    assert exc.value.code == "DEVICE_CONFIG_INVALID"
    text = str(exc.value)
    assert SECRET not in text
    return text


def test_a_full_config() -> None:
    spec = drv.parse_config({
        "target": "10.0.0.1, host-2:3261,[fd00::1]:3262", "port": "3300",
        "targetIQN": "iqn.2026-11.test:a", "SCSIid": "360000000000000000e00000000010001",
        "chapuser": "u", "chappassword": SECRET, "multihomed": "true",
    })
    assert spec.portals == (("10.0.0.1", 3300), ("host-2", 3261), ("fd00::1", 3262))
    assert spec.iqn == "iqn.2026-11.test:a" and spec.multihomed
    assert spec.chap is not None and spec.chap.secret == SECRET
    assert SECRET not in repr(spec)  # secrets are not in any repr (logs)


def test_missing_and_bad_keys_are_named() -> None:
    assert "'target'" in bad({})
    assert "'port'" in bad({"target": "h", "port": "http"})
    assert "'target'" in bad({"target": "h;rm -rf /"})
    assert "'targetIQN'" in bad({"target": "h", "targetIQN": "not an iqn"})
    assert "'SCSIid'" in bad({"target": "h", "SCSIid": "../../etc"})
    assert "'chappassword'" in bad({"target": "h", "chapuser": "u"})
    assert "'chapuser'" in bad({"target": "h", "chappassword": SECRET})
    assert "'incoming_chappassword'" in bad({"target": "h", "chapuser": "u",
                                             "chappassword": SECRET, "incoming_chapuser": "i"})
    assert "'chapuser'" in bad({"target": "h", "incoming_chapuser": "i",
                                "incoming_chappassword": SECRET})
    assert "'multihomed'" in bad({"target": "h", "multihomed": "perhaps"})
    assert "'chappassword'" in bad({"target": "h", "chapuser": "u", "chappassword": SECRET + "\n"})


def test_target_and_lun_may_be_left_out_until_create() -> None:
    spec = drv.parse_config({"target": "h"})
    assert (spec.iqn, spec.scsi_id, spec.chap) == ("", "", None)
    assert spec.portals == (("h", 3260),)
