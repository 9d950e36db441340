"""``Info``: what ``smcommon.vhd.info()`` tells about an image (docs/design.md)."""

from __future__ import annotations

from smcommon.record import asdict, record


@record(frozen=True)
class Info:
    path: str
    uuid: str
    disk_type: str
    virtual_size: int
    physical_size: int
    block_size: int
    max_blocks: int
    allocated_blocks: int
    parent: str | None
    parent_uuid: str | None
    hidden: bool
    depth: int
    creator: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
