"""smcommon.api: the SMAPI as data, and request validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smcommon import api
from smcommon.errors import BackendError, InvalidRequest

# shared/API.md's method table: method -> inputs besides dbg, in order; output type
API_TABLE = {
    "Query.query": ([], "query_result"),
    "Query.diagnostics": ([], "string"),
    "SR.ls": ([], "string list"),
    "SR.create": (["sr", "device_config", "physical_size"], "unit"),
    "SR.attach": (["sr", "device_config"], "unit"),
    "SR.detach": (["sr"], "unit"),
    "SR.destroy": (["sr"], "unit"),
    "SR.reset": (["sr"], "unit"),
    "SR.scan": (["sr"], "vdi_info list"),
    "VDI.create": (["sr", "vdi_info"], "vdi_info"),
    "VDI.snapshot": (["sr", "vdi_info"], "vdi_info"),
    "VDI.clone": (["sr", "vdi_info"], "vdi_info"),
    "VDI.destroy": (["sr", "vdi"], "unit"),
    "VDI.stat": (["sr", "vdi"], "vdi_info"),
    "VDI.set_persistent": (["sr", "vdi", "persistent"], "unit"),
    "VDI.epoch_begin": (["sr", "vdi"], "unit"),
    "VDI.epoch_end": (["sr", "vdi"], "unit"),
    "VDI.attach": (["dp", "sr", "vdi", "read_write"], "attach_info"),
    "VDI.activate": (["dp", "sr", "vdi"], "unit"),
    "VDI.deactivate": (["dp", "sr", "vdi"], "unit"),
    "VDI.detach": (["dp", "sr", "vdi"], "unit"),
    "VDI.copy": (["sr", "vdi", "url", "dest"], "string"),
    "VDI.get_url": (["sr", "vdi"], "string"),
    "VDI.get_by_name": (["sr", "name"], "vdi_info"),
    "VDI.set_content_id": (["sr", "vdi", "content_id"], "unit"),
    "VDI.compose": (["sr", "vdi1", "vdi2"], "unit"),
    "VDI.similar_content": (["sr", "vdi"], "vdi_info list"),
}

VDI_INFO_FIELDS = {
    "vdi": "string",
    "content_id": "string",
    "name_label": "string",
    "name_description": "string",
    "ty": "string",
    "metadata_of_pool": "string",
    "is_a_snapshot": "bool",
    "snapshot_time": "string",
    "snapshot_of": "string",
    "read_only": "bool",
    "virtual_size": "int64",
    "physical_utilisation": "int64",
    "persistent": "bool",
    "sm_config": "string->string map",
}


def test_every_method_of_the_api_is_described_in_order():
    assert set(api.METHODS) == set(API_TABLE)
    for name, (inputs, output) in API_TABLE.items():
        m = api.METHODS[name]
        assert list(m.inputs) == ["dbg", *inputs], name
        assert m.output.name == output, name
        assert m.description, name
        assert all(a.description for a in m.inputs.values()), name


def test_struct_types_have_the_api_fields():
    assert {n: f.type.name for n, f in api.VDI_INFO.fields.items()} == VDI_INFO_FIELDS
    assert list(api.ATTACH_INFO.fields) == ["params", "xenstore_data"]
    assert list(api.QUERY_RESULT.fields) == [
        "driver", "name", "description", "vendor", "copyright", "version",
        "required_api_version", "features", "configuration",
    ]  # fmt: skip
    assert api.QUERY_RESULT.fields["features"].type is api.STRING_LIST


def test_attr_is_the_lower_cased_name_with_underscores():
    assert api.METHODS["VDI.create"].attr == "vdi_create"
    assert api.METHODS["Query.query"].attr == "query_query"
    assert api.METHODS["VDI.get_by_name"].attr == "vdi_get_by_name"


def _stat(**params):
    return api.METHODS["VDI.stat"].validate(
        {"dbg": "d", "sr": "sr1", "vdi": "v1", **params}
    )


def test_validate_returns_keyword_arguments():
    assert _stat() == {"dbg": "d", "sr": "sr1", "vdi": "v1"}


def test_missing_argument_names_method_and_argument():
    with pytest.raises(InvalidRequest, match=r"VDI\.stat: missing argument 'vdi'"):
        api.METHODS["VDI.stat"].validate({"dbg": "d", "sr": "sr1"})
    with pytest.raises(InvalidRequest, match="missing argument 'dbg'"):
        api.METHODS["VDI.stat"].validate({"sr": "sr1", "vdi": "v"})


def test_extra_argument_names_method_and_argument():
    with pytest.raises(
        InvalidRequest, match=r"VDI\.stat: unexpected argument 'colour'"
    ):
        _stat(colour="blue")


@pytest.mark.parametrize("value", [3, True, None, ["a"], {"a": "b"}, b"x"])
def test_mistyped_string_argument(value):
    with pytest.raises(
        InvalidRequest, match=r"VDI\.stat: argument vdi must be a string"
    ):
        _stat(vdi=value)


def test_params_must_be_a_struct():
    with pytest.raises(InvalidRequest, match="takes one struct argument"):
        api.METHODS["SR.ls"].validate(["dbg"])


@pytest.mark.parametrize(
    "key",
    ["..", "../etc", "a/b", "/abs", "", "a\0b", "x" * 129, ".hidden", "-opt", "a b"],
)
def test_keys_that_could_name_another_path_are_refused(key):
    with pytest.raises(InvalidRequest, match="argument sr "):
        api.METHODS["SR.scan"].validate({"dbg": "d", "sr": key})
    with pytest.raises(InvalidRequest, match="argument vdi2 "):
        api.METHODS["VDI.compose"].validate(
            {"dbg": "d", "sr": "s", "vdi1": "a", "vdi2": key}
        )


def test_uuid_keys_are_fine():
    sr = "3f0d6e4c-6a3c-4b8e-9a43-7b0d3c2a1f00"
    assert api.METHODS["SR.scan"].validate({"dbg": "d", "sr": sr})["sr"] == sr


def test_dp_and_name_are_free_strings():
    m = api.METHODS["VDI.attach"]
    kw = m.validate(
        {"dbg": "d", "dp": "vbd/3/xvda", "sr": "s", "vdi": "v", "read_write": True}
    )
    assert kw["dp"] == "vbd/3/xvda" and kw["read_write"] is True
    kw = api.METHODS["VDI.get_by_name"].validate(
        {"dbg": "d", "sr": "s", "name": "my disk/1"}
    )
    assert kw["name"] == "my disk/1"


def _create_size(value):
    m = api.METHODS["SR.create"]
    return m.validate(
        {"dbg": "d", "sr": "s", "device_config": {}, "physical_size": value}
    )["physical_size"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (2**31 - 1, 2**31 - 1),
        (2**40, 2**40),
        (-5, -5),
        ("10737418240", 10737418240),
        (" 42 ", 42),
        ("+7", 7),
        ("-7", -7),
        (str(2**63 - 1), 2**63 - 1),
        (str(-(2**63)), -(2**63)),
    ],
)
def test_int64_accepts_ints_and_decimal_strings(value, expected):
    assert _create_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["1.5", "1e3", "ten", "", "0x10", "10G", "١٢", "1_000", True, 1.0, None, [1]],
)
def test_int64_refuses_what_is_not_an_integer(value):
    with pytest.raises(
        InvalidRequest, match=r"SR\.create: argument physical_size must be an int64"
    ):
        _create_size(value)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, str(2**63), "9" * 19 + "0"])
def test_int64_range(value):
    with pytest.raises(InvalidRequest, match="physical_size"):
        _create_size(value)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int64_decimal_string_round_trip(n):
    assert _create_size(str(n)) == n
    assert _create_size(n) == n


def _create_info(vdi_info):
    return api.METHODS["VDI.create"].validate(
        {"dbg": "d", "sr": "s", "vdi_info": vdi_info}
    )["vdi_info"]


def test_partial_vdi_info_gets_defaults():
    info = _create_info({"name_label": "d0", "virtual_size": "1024"})
    assert info == {
        "vdi": "",
        "content_id": "",
        "name_label": "d0",
        "name_description": "",
        "ty": "",
        "metadata_of_pool": "",
        "is_a_snapshot": False,
        "snapshot_time": "",
        "snapshot_of": "",
        "read_only": False,
        "virtual_size": 1024,
        "physical_utilisation": 0,
        "persistent": True,
        "sm_config": {},
    }


def test_defaults_are_not_shared_between_calls():
    a = _create_info({})
    a["sm_config"]["x"] = "y"
    assert _create_info({})["sm_config"] == {}


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("virtual_size", "big", "int64"),
        ("persistent", "yes", "boolean"),
        ("name_label", 5, "string"),
        ("sm_config", ["a"], "map"),
        ("sm_config", {"a": 1}, "string"),
    ],
)
def test_vdi_info_field_types_are_checked(field, value, expected):
    with pytest.raises(
        InvalidRequest, match=rf"argument vdi_info\.{field}.*{expected}"
    ):
        _create_info({field: value})


def test_unknown_vdi_info_fields_of_newer_toolstacks_are_dropped():
    info = _create_info({"name_label": "d", "sharable": True, "cbt_enabled": False})
    assert info["name_label"] == "d"
    assert "sharable" not in info and "cbt_enabled" not in info


def test_device_config_must_map_strings_to_strings():
    m = api.METHODS["SR.attach"]
    assert m.validate({"dbg": "d", "sr": "s", "device_config": {"path": "/x"}})[
        "device_config"
    ] == {"path": "/x"}
    with pytest.raises(
        InvalidRequest, match=r"device_config\['port'\] must be a string"
    ):
        m.validate({"dbg": "d", "sr": "s", "device_config": {"port": 3260}})


def test_a_mistyped_device_config_value_is_never_echoed():
    # device_config carries CHAP passwords; errors reach the log and the caller.
    m = api.METHODS["SR.attach"]
    with pytest.raises(InvalidRequest) as e:
        m.validate(
            {"dbg": "d", "sr": "s", "device_config": {"chappassword": ["hunter2"]}}
        )
    assert "chappassword" in str(e.value) and "array" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_extra_method_gets_dbg_and_is_found_by_lookup():
    gc = api.Method("SR.gc", [api.Arg("sr", api.KEY, "the SR")], api.ANY, "collect")
    assert list(gc.inputs) == ["dbg", "sr"]
    assert gc.attr == "sr_gc"
    assert api.lookup("SR.gc", [gc]) is gc
    assert api.lookup("VDI.stat", [gc]) is api.METHODS["VDI.stat"]


def test_unknown_method_has_its_own_code():
    with pytest.raises(api.UnknownMethod, match="unknown method VDI.frobnicate") as e:
        api.lookup("VDI.frobnicate")
    assert e.value.code == "UNKNOWN_METHOD"
    assert isinstance(e.value, InvalidRequest)


def test_result_check_fills_defaults():
    out = api.METHODS["VDI.stat"].check_result({"vdi": "v", "virtual_size": 2**40})
    assert (
        out["persistent"] is True and out["virtual_size"] == 2**40 and out["ty"] == ""
    )


def test_bad_result_is_an_internal_error():
    with pytest.raises(BackendError) as e:
        api.METHODS["VDI.stat"].check_result({"vdi": "v", "virtual_size": "lots"})
    assert e.value.code == "INTERNAL_ERROR"
    assert "result of VDI.stat.virtual_size" in str(e.value)
    with pytest.raises(BackendError):
        api.METHODS["SR.ls"].check_result("sr1")


def test_unit_result_is_none_whatever_the_driver_returns():
    assert api.METHODS["VDI.destroy"].check_result({}) is None
    assert api.METHODS["VDI.destroy"].check_result(None) is None


def test_a_bad_item_of_a_long_result_is_named_by_index_and_field():
    """Items are checked on a fast path (an SR.scan result holds 10,000 structs);
    the error still names the item and the field."""
    good = {"vdi": "v", "virtual_size": 1, "read_only": False, "sm_config": {"a": "b"}}
    bad = dict(good, read_only="no")
    scan = api.METHODS["SR.scan"]
    assert scan.check_result([good] * 3) == [scan.output.item.convert(good, "x")] * 3
    with pytest.raises(BackendError) as e:
        scan.check_result([good, good, bad, good])
    assert "result of SR.scan[2].read_only" in str(e.value)
    with pytest.raises(BackendError) as e:
        scan.check_result([good, dict(good, virtual_size=2**63)])
    assert "result of SR.scan[1].virtual_size" in str(e.value)
