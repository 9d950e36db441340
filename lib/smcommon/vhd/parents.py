"""Finding a differencing image's parent: from its locators, inside the allowed
directories only.

Candidates are the W2RU, W2KU and MACX locators in that order (whatever their
order in the header), then the header's parent name; each is resolved
relative to the child's real directory (an absolute path stays absolute) and
the first that names an existing file inside the allowed roots wins.  Paths
outside the roots are never opened.

An image in a block device is located by the name it was opened by
(``image_place``): ``/dev/VG/LV`` or an SR's device directory names it and its
parents, while the node the name resolves to (``/dev/dm-3``, ``/dev/loop7``)
lives elsewhere.
"""

from __future__ import annotations

import os
import stat

from smcommon.vhd import format as fmt
from smcommon.vhd.errors import Corrupt, ParentMissing, ParentNotAllowed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from smcommon.vhd.reader import ImageReader as Image

LOCATOR_ORDER = (fmt.LOC_W2RU, fmt.LOC_W2KU, fmt.LOC_MACX)


def image_place(path: str) -> str:
    """The path that locates an image: a file's real path (symlinks resolved), but a
    block device's own name (its directory resolved): parents of an image in a
    device are named in the directory that names the device."""
    real = os.path.realpath(path)
    if is_block_device(real):
        full = os.path.normpath(os.path.abspath(path))
        return os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
    return real


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def is_image_node(path: str) -> bool:
    """A regular file or a block device (a logical volume holds an image too)."""
    return os.path.isfile(path) or is_block_device(path)


def within(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def resolve(child_dir: str, label: str, text: str) -> str:
    """The path a locator (or the parent name) names, as a path from the child's
    directory: Windows separators of W2RU/W2KU become slashes, as libvhd does."""
    if label in ("W2ru", "W2ku"):
        text = text.replace("\\", "/")
    return os.path.normpath(os.path.join(child_dir, text))


def candidates(img: Image) -> list[tuple[str, str]]:
    """(label, path text) of each way to the parent, in the order tried."""
    header = img.header_or_fail()
    out: list[tuple[str, str]] = []
    by_code = {loc.code: loc for loc in header.locators if loc.used}
    for code in LOCATOR_ORDER:
        loc = by_code.get(code)
        if loc is None or loc.data_length > fmt.MAX_LOCATOR_DATA or loc.data_length == 0:
            continue
        if loc.data_offset + loc.data_length > img.end():
            raise Corrupt(f"{img.path}: parent locator {code.decode()} data past the end")
        raw = img._pread(loc.data_length, loc.data_offset, "a locator")
        out.append((code.decode(), fmt.decode_locator(code, raw)))
    if header.parent_name:
        out.append(("parent name", header.parent_name))
    return out


def find_parent(img: Image, search_dirs: list[str] | None = None) -> str:
    """The parent's path: the first candidate naming a file inside the allowed roots."""
    child_dir = os.path.dirname(image_place(img.path))   # where the image really is
    roots = [os.path.realpath(d) for d in (search_dirs or [child_dir])]
    found = candidates(img)
    rejected: list[str] = []
    for label, text in found:
        if not text:
            continue
        full = resolve(child_dir, label, text)
        real = image_place(full)
        if not within(real, roots):
            rejected.append(f"{label} {text!r}")
            continue
        if is_image_node(real):
            return full
    if rejected:
        raise ParentNotAllowed(
            f"{img.path}: parent {', '.join(rejected)} resolves outside the allowed "
            f"directories ({', '.join(roots)})"
        )
    names = ", ".join(f"{label} {text!r}" for label, text in found) or "no locator"
    raise ParentMissing(f"{img.path}: parent not found ({names})")
