"""Round trips and validation of the on-disk structures (smcommon.vhd.format)."""

from __future__ import annotations

import struct

import pytest
from smcommon.vhd import format as fmt
from smcommon.vhd.errors import Corrupt


def test_footer_round_trips_byte_for_byte() -> None:
    footer = fmt.Footer.new(10 * 2**20, fmt.DISK_DYNAMIC, bytes(range(16)), 512)
    raw = footer.to_bytes()
    assert len(raw) == 512
    assert raw[:8] == b"conectix" and raw[28:32] == b"tap\0"
    again = fmt.Footer.from_bytes(raw)
    assert again == footer and again.to_bytes() == raw


def test_footer_checksum_is_ones_complement_of_byte_sum() -> None:
    raw = bytearray(fmt.Footer.new(4 * 2**20, fmt.DISK_FIXED, bytes(16), fmt.NO_OFFSET).to_bytes())
    stored = struct.unpack(">I", raw[64:68])[0]
    raw[64:68] = bytes(4)
    assert stored == (~sum(raw)) & 0xFFFFFFFF


def test_footer_hidden_flag_is_byte_85() -> None:
    footer = fmt.Footer.new(2**21, fmt.DISK_DYNAMIC, bytes(16), 512).sealed(hidden=1)
    raw = footer.to_bytes()
    assert raw[85] == 1 and raw[84] == 0
    assert fmt.Footer.from_bytes(raw).hidden == 1


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, b"X", "bad cookie"), (100, b"\x01", "bad checksum"), (12, b"\x00\x02", "version")],
)
def test_footer_damage_is_named(offset: int, value: bytes, message: str) -> None:
    raw = bytearray(fmt.Footer.new(2**21, fmt.DISK_DYNAMIC, bytes(16), 512).to_bytes())
    raw[offset : offset + len(value)] = value
    if message == "version":  # a well-sealed footer with major version 2
        raw[64:68] = bytes(4)
        raw[64:68] = struct.pack(">I", fmt.checksum(raw))
    with pytest.raises(Corrupt, match=message):
        fmt.Footer.from_bytes(bytes(raw))


def test_footer_truncated_and_unknown_type() -> None:
    with pytest.raises(Corrupt, match="truncated"):
        fmt.Footer.from_bytes(b"conectix")
    footer = fmt.Footer.new(2**21, fmt.DISK_DYNAMIC, bytes(16), 512).sealed(disk_type=7)
    with pytest.raises(Corrupt, match="unknown disk type 7"):
        fmt.Footer.from_bytes(footer.to_bytes())


def test_header_round_trips_with_locators_and_parent_name() -> None:
    locs = [fmt.Locator(fmt.LOC_W2RU, 16, 22, 0, 1536), fmt.Locator(fmt.LOC_MACX, 16, 30, 0, 9728)]
    header = fmt.Header.new(26112, 51, fmt.BLOCK_SIZE, bytes(range(16)), 12345, "base.vhd", locs)
    raw = header.to_bytes()
    assert len(raw) == 1024 and raw[:8] == b"cxsparse"
    again = fmt.Header.from_bytes(raw)
    assert again == header and again.to_bytes() == raw
    assert again.parent_name == "base.vhd"
    assert again.locators[:2] == locs and not again.locators[2].used
    assert raw[64 : 64 + 16] == "base.vhd".encode("utf-16-be")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"block_size": 3 * 2**20}, "power of two"),
        ({"block_size": 0}, "power of two"),
        ({"max_table_entries": 2**30}, "max table entries"),
        ({"max_table_entries": 0}, "max table entries"),
        ({"table_offset": 1537}, "not sector aligned"),
        ({"data_offset": 0}, "data offset"),
    ],
)
def test_header_validate_bounds(changes: dict[str, int], message: str) -> None:
    header = fmt.Header.new(1536, 10).sealed(**changes)
    parsed = fmt.Header.from_bytes(header.to_bytes())
    with pytest.raises(Corrupt, match=message):
        parsed.validate()


def test_header_bad_checksum() -> None:
    raw = bytearray(fmt.Header.new(1536, 10).to_bytes())
    raw[40] ^= 1
    with pytest.raises(Corrupt, match="bad checksum"):
        fmt.Header.from_bytes(bytes(raw))


def test_locator_encodings_as_blktap() -> None:
    assert fmt.encode_locator(fmt.LOC_W2RU, "./a.vhd") == "./a.vhd".encode("utf-16-le")
    assert fmt.encode_locator(fmt.LOC_MACX, "/x/a.vhd") == b"file:///x/a.vhd"
    assert fmt.decode_locator(fmt.LOC_MACX, b"file:///x/a.vhd") == "/x/a.vhd"
    assert fmt.decode_locator(fmt.LOC_W2KU, "/x/é.vhd\0".encode("utf-16-le")) == "/x/é.vhd"
    with pytest.raises(Corrupt, match="undecodable"):
        fmt.decode_locator(fmt.LOC_MACX, b"\xff\xfe\xfd")
    loc = fmt.Locator(fmt.LOC_W2KU, 16, 40, 0, 2**33)
    assert fmt.Locator.from_bytes(loc.to_bytes()) == loc


def test_bat_round_trip_big_endian_and_padding() -> None:
    bat = fmt.Bat.empty(3)
    bat[1] = 0x01020304
    raw = bat.to_bytes()
    assert len(raw) == 512
    assert raw[:12] == b"\xff\xff\xff\xff\x01\x02\x03\x04\xff\xff\xff\xff"
    assert raw[12:] == b"\xff" * 500
    again = fmt.Bat.from_bytes(raw, 3)
    assert list(again.entries) == list(bat.entries) and again.allocated() == [1]
    with pytest.raises(Corrupt, match="truncated"):
        fmt.Bat.from_bytes(raw[:8], 3)


def test_bat_scans_large_tables() -> None:
    bat = fmt.Bat.empty(1_044_480)
    assert bat.allocated() == [] and bat.allocated_count() == 0
    bat[5000] = 100
    bat[1_044_479] = 50
    bat[7] = 100
    assert bat.allocated() == [7, 5000, 1_044_479]
    assert bat.allocated_count() == 3
    assert bat.offsets() == [50, 100, 100]          # the duplicate stays visible


def test_bitmap_msb_first() -> None:
    raw = bytes([0b1000_0001]) + bytes(511)
    bits = fmt.bitmap_to_int(raw)
    assert bits == (1 << 0) | (1 << 7)
    assert fmt.int_to_bitmap(bits, 512) == raw
    assert fmt.bitmap_size(fmt.BLOCK_SIZE) == 512
    assert fmt.bitmap_size(512 * 1024 * 16) == 2048


def test_runs_of_set_bits() -> None:
    assert fmt.runs(0) == []
    assert fmt.runs(0b1110_0110) == [(1, 2), (5, 3)]
    assert fmt.runs(fmt.sector_mask(10, 4086)) == [(10, 4086)]
    many = sum(1 << i for i in range(0, 4096, 2))
    assert len(fmt.runs(many)) == 2048


def test_geometry_matches_the_specification() -> None:
    assert fmt.geometry(10 * 2**20) == (301, 4, 17)   # 20480 sectors / 17 / 4
    assert fmt.geometry(10514432) == (302, 4, 17)     # what qemu-img writes for 10M
    c, h, s = fmt.geometry(2040 * 2**30)
    assert (c, h, s) == (65535, 16, 255)
