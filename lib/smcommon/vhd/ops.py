"""Operations over image paths: info, chain, read, write, hidden flag, re-parenting,
coalesce, resize and the allocation map.

Each function opens what it needs, does one thing and closes; every failure is
a VhdError.  ``search_dirs`` (internal API) widens where parents may be found;
by default a parent must live in its child's own directory.
"""

from __future__ import annotations

import os

from smcommon.vhd import format as fmt
from smcommon.vhd.image import Image, Info, open_image


def info(path: str | os.PathLike[str], *, search_dirs: list[str] | None = None) -> Info:
    with open_image(path, search_dirs=search_dirs) as img:
        return img.info()


def chain(path: str | os.PathLike[str], *, search_dirs: list[str] | None = None) -> list[str]:
    """The image's path, then each parent's, leaf first."""
    with open_image(path, search_dirs=search_dirs) as img:
        return [i.path for i in img.chain()]


def read(path: str | os.PathLike[str], offset: int, length: int, *,
         search_dirs: list[str] | None = None) -> bytes:
    with open_image(path, search_dirs=search_dirs) as img:
        return img.read(offset, length)


def write(path: str | os.PathLike[str], offset: int, data: bytes, *,
          search_dirs: list[str] | None = None) -> None:
    with open_image(path, writable=True, search_dirs=search_dirs) as img:
        img.write(offset, data)


def set_hidden(path: str | os.PathLike[str], hidden: bool) -> None:
    """Set blktap's hidden byte (footer offset 85) in both footer copies."""
    with Image.open(path, writable=True, parents=False) as img:
        img.set_footer(img.footer.sealed(hidden=1 if hidden else 0))


__all__ = ["info", "chain", "read", "write", "set_hidden", "fmt"]
