"""Operations over image paths: info, chain, read, write, hidden flag, re-parenting,
coalesce, resize and the allocation map.

Each function opens what it needs, does one thing and closes; every failure is
a VhdError.  ``search_dirs`` (internal API) widens where parents may be found;
by default a parent must live in its child's own directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from smcommon import progress
from smcommon.vhd import format as fmt
from smcommon.vhd import relayout
from smcommon.vhd.create import check_parent_allowed, check_size, parent_locators
from smcommon.vhd.errors import (
    Corrupt,
    DataBeyondEnd,
    InvalidArgument,
    ParentLoop,
    ParentMismatch,
    Unsupported,
    from_os_error,
)
from smcommon.vhd.image import (
    LOCATOR_ORDER,
    Image,
    Info,
    copy_range,
    node_key,
    open_image,
)
from smcommon.vhd.reader import ImageReader


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
    if not isinstance(hidden, bool):
        raise InvalidArgument(f"hidden must be True or False, not {hidden!r}")
    with Image.open(path, writable=True, parents=False) as img:
        img.set_footer(img.footer.sealed(hidden=1 if hidden else 0))


def set_parent(
    child: str | os.PathLike[str],
    parent: str | os.PathLike[str],
    *,
    search_dirs: list[str] | None = None,
    lock_timeout: float | None = None,
) -> None:
    """Re-link differencing ``child`` to ``parent``: its UUID, timestamp and locators.

    The new locators go into free space (never into the space of a locator
    in use, never past a locator's real space), then one header write
    switches to them: killed at any instant, the child names its old parent
    or its new one, whole (see ``relayout.relink``).  The child's lock is
    waited for at most ``lock_timeout`` seconds (Busy);
    ``live.set_parent_live`` re-links a child a backend holds open.
    """
    child, parent = os.fspath(child), os.fspath(parent)
    check_parent_allowed(child, parent, search_dirs)
    with Image.open(child, writable=True, parents=False, lock_timeout=lock_timeout) as img:
        write_parent_link(img, parent, search_dirs)


def write_parent_link(img: Image, parent: str, search_dirs: list[str] | None, *,
                      may_move: bool = True) -> None:
    """The re-link of ``img`` (open for writing, footer, header and BAT loaded)
    to ``parent``; ``may_move`` False refuses (Unsupported) rather than move
    data blocks to make room for the locators."""
    child = img.path
    if img.footer.disk_type != fmt.DISK_DIFFERENCING:
        raise Unsupported(f"{child}: a {img.footer.type_name} image has no parent to set")
    st = os.fstat(img.fd)
    # the child is locked exclusively: opening it again as an ancestor would wait
    # on ourselves, so it is excluded up front (ParentLoop)
    with Image.open(parent, search_dirs=search_dirs, _seen={node_key(st)}) as pimg:
        for anc in pimg.chain():
            if node_key(os.fstat(anc.fd)) == node_key(st):
                raise ParentLoop(f"{child}: {parent} is {child} or one of its descendants")
        if not pimg.is_fixed and pimg.block_size != img.block_size:
            raise Unsupported(f"{parent}: block size {pimg.block_size} differs from the "
                              f"child's {img.block_size}")
        header = img.header_or_fail()
        codes = tuple(loc.code for loc in header.locators
                      if loc.used and loc.code in LOCATOR_ORDER) or LOCATOR_ORDER
        name, payloads = parent_locators(child, parent, codes)
        relayout.relink(img, pimg.footer, name, payloads, may_move=may_move)


def coalesce(
    child: str | os.PathLike[str],
    *,
    search_dirs: list[str] | None = None,
    shadowed: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> int:
    """Copy the child's allocated sectors into its parent; return the bytes copied.

    Only copies: the child is untouched, so a coalesce killed mid-way and run
    again finishes with the same result.  The parent grows first if it is
    smaller than the child.

    ``shadowed``: the caller guarantees that every reader of the parent reads
    it through the child (so never the sectors written here): the parent is
    then written without its lock, and readers holding it open (a running
    VM's backend) are not waited for; a parent smaller than the child is
    refused (growing its BAT would move blocks under those readers).
    ``on_batch(done, total)`` is called after each batch with the bytes of
    child blocks handled so far and in all; an exception it raises stops the
    coalesce (which a later run finishes).
    """
    child = os.fspath(child)
    with open_image(child, search_dirs=search_dirs) as img:
        if img.parent is None:
            raise Unsupported(f"{child}: a {img.footer.type_name} image has no parent")
        ppath = img.parent.path
        psize = img.parent.virtual_size
        # release the shared lock our chain holds on the parent before locking it to write
        img.parent.close()
        img.parent = None
        if psize < img.virtual_size:
            if shadowed:
                raise Unsupported(f"{ppath}: smaller than its child {child}; a shadowed "
                                  "coalesce cannot grow it under its readers")
            resize(ppath, img.virtual_size, search_dirs=search_dirs)
        with Image.open(ppath, writable=True, parents=False, lock=not shadowed) as parent:
            return _copy_blocks(img, parent, not shadowed, on_batch)


COALESCE_BATCH = 32


def _copy_blocks(img: Image, parent: Image, locked: bool,
                 on_batch: Callable[[int, int], None] | None) -> int:
    """Copy every allocated sector of ``img`` into ``parent``; return the bytes copied.

    Works in batches of COALESCE_BATCH blocks; when ``locked``, each under the
    parent's exclusive lock (released between batches, so readers of the
    images above wait for one batch, not the whole coalesce).  Blocks new to the parent are
    appended (footer moved once, data streamed, one fdatasync, BAT entries,
    one fdatasync); sectors of blocks the parent has are written in place.
    """
    assert img.bat is not None
    bat = img.bat
    blocks = sorted(bat.allocated(), key=bat.__getitem__)    # the child's file order
    total = len(blocks) * img.block_size
    with contextlib.suppress(OSError):  # a cold child is read in file order
        os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    if locked:
        parent.unlock()
    copied = 0
    with progress.track("coalesce", total) as done:
        for i in range(0, len(blocks), COALESCE_BATCH):
            if locked:
                parent.relock(exclusive=True)
            try:
                if parent.footer.uuid != img.header_or_fail().parent_uuid:
                    raise ParentMismatch(f"{parent.path}: changed while coalescing {img.path}")
                copied += _copy_batch(img, parent, blocks[i : i + COALESCE_BATCH])
            finally:
                if locked:
                    parent.unlock()
            done.set(min(len(blocks), i + COALESCE_BATCH) * img.block_size)
            if on_batch is not None:
                on_batch(min(len(blocks), i + COALESCE_BATCH) * img.block_size, total)
    return copied


def _copy_batch(img: Image, parent: Image, blocks: list[int]) -> int:
    """Copy the sectors of ``blocks`` the child has (its bitmap's runs, one
    ``copy_file_range`` each): in place into blocks the parent has (then the
    parent's bitmap bits), else into new blocks appended to the parent.  A new
    block's space lies past the parent's old end, so what is not written
    there reads as zeros (a file hole), never as stale bytes."""
    bs, vsize = img.block_size, img.virtual_size
    full = fmt.sector_mask(0, bs // fmt.SECTOR)
    fresh = {b for b in blocks if not parent.is_fixed and parent.block_pos(b) is None}
    stride = parent.block_stride
    base = parent.reserve_blocks(len(fresh)) if fresh else 0
    diff = parent.footer.disk_type == fmt.DISK_DIFFERENCING
    placed: list[tuple[int, int]] = []
    copied = 0
    for block in blocks:
        pos = img.block_pos(block)
        assert pos is not None
        bits = img.bitmap(block, pos)
        bits = full if bits == -1 else bits
        limit = fmt.blocks_for(vsize - block * bs, fmt.SECTOR)   # sectors inside the disk
        if limit < bs // fmt.SECTOR:
            bits &= fmt.sector_mask(0, limit)
        spans = fmt.runs(bits)
        copied += sum(c for _, c in spans) * fmt.SECTOR
        if parent.is_fixed:
            dst = block * bs
        elif block in fresh:
            bpos = base + len(placed) * stride
            if diff and not parent._is_full(bits):
                bitmap = fmt.int_to_bitmap(bits, parent.bitmap_size)
            else:       # a dynamic disk's unwritten sectors are the hole's zeros: all present
                bitmap = b"\xff" * parent.bitmap_size
                parent._filled.add(block)
            parent._pwrite(bitmap, bpos, "a sector bitmap")
            placed.append((block, bpos))
            dst = bpos + parent.bitmap_size
        else:
            ppos = parent.block_pos(block)
            assert ppos is not None
            dst = ppos + parent.bitmap_size
        src = pos + img.bitmap_size
        for first, count in spans:
            at = first * fmt.SECTOR
            copy_range(img.fd, parent.fd, src + at, dst + at, count * fmt.SECTOR, parent.path)
        with contextlib.suppress(OSError):  # write it back now, not all at the batch's sync
            os.posix_fadvise(parent.fd, dst, bs, os.POSIX_FADV_DONTNEED)
        if not parent.is_fixed and block not in fresh:
            ppos = parent.block_pos(block)
            assert ppos is not None
            old = parent.bitmap(block, ppos)
            if old != -1 and (old | bits) != old:
                parent._pwrite(fmt.int_to_bitmap(old | bits, parent.bitmap_size), ppos,
                               "a sector bitmap")
            if parent._is_full(old | bits) and parent.batmap is not None \
                    and not parent.batmap.test(block):
                parent._filled.add(block)
    parent.commit_blocks(placed)         # syncs the in-place writes too, then the batmap
    return copied


def resize(path: str | os.PathLike[str], new_size: int, *,
           search_dirs: list[str] | None = None) -> Info:
    """Grow or shrink the virtual size (rounded up to 2 MiB); shrink refused over data."""
    path = os.fspath(path)
    size = check_size(new_size, "new size")
    with Image.open(path, writable=True, parents=False) as img:
        if img.tail_damaged:
            raise Corrupt(f"{path}: tail footer damaged; run repair first")
        if img.is_fixed:
            if img.in_device:
                raise Unsupported(f"{path}: resizing a fixed image inside a block device")
            _resize_fixed(img, size)
        else:
            _resize_dynamic(img, size)
    return info(path, search_dirs=search_dirs)


def _resize_fixed(img: Image, size: int) -> None:
    old = img.virtual_size
    footer = _resized_footer(img.footer, size)
    if size > old:
        # the new footer at the new end first (one write: the file is then a sound
        # fixed disk of the new size), then zeros over the old footer, now disk data
        img.footer = footer
        img._set_end(size)
        img._pwrite(bytes(fmt.FOOTER_SIZE), old, "zeros over the old footer")
        img.sync()
    elif size < old:
        zero = bytes(fmt.BLOCK_SIZE)
        for at in range(size, old, fmt.BLOCK_SIZE):
            chunk = img._pread(min(fmt.BLOCK_SIZE, old - at), at, "data")
            if chunk != zero[: len(chunk)]:
                raise DataBeyondEnd(f"{img.path}: data beyond the new end {size} (at {at})")
        img._pwrite(footer.to_bytes(), size, "the footer")
        img.sync()
        try:
            os.ftruncate(img.fd, size + fmt.FOOTER_SIZE)
        except OSError as exc:
            raise from_os_error(img.path, exc, "truncating") from None
        img._size = size + fmt.FOOTER_SIZE
        img.footer = footer
        img.sync()


def _resized_footer(footer: fmt.Footer, size: int) -> fmt.Footer:
    cyl, heads, spt = fmt.geometry(size)
    return footer.sealed(current_size=size, cylinders=cyl, heads=heads, sectors=spt)


def _resize_dynamic(img: Image, size: int) -> None:
    header = img.header_or_fail()
    assert img.bat is not None
    bs = header.block_size
    need = fmt.blocks_for(size, bs)
    if size < img.virtual_size:
        beyond = [b for b in img.bat.allocated() if (b + 1) * bs > size]
        if beyond:
            raise DataBeyondEnd(f"{img.path}: {len(beyond)} allocated block(s) lie beyond the "
                                f"new end {size} (first at {beyond[0] * bs})")
    elif need > header.max_table_entries:
        relayout.grow_bat(img, need)
    if size != img.virtual_size:
        relayout.prepare_size(img, size)
        img.set_footer(_resized_footer(img.footer, size))
        img.bat = relayout.live_bat(img)


def allocation_map(path: str | os.PathLike[str], *,
                   search_dirs: list[str] | None = None) -> list[tuple[int, int, int]]:
    """(offset, length, depth) extents covering the disk: depth 1 = the image itself,
    2 = its parent …, 0 = in no image (reads as zeros).  Adjacent extents merge."""
    out: list[tuple[int, int, int]] = []

    def add(offset: int, length: int, depth: int) -> None:
        if length <= 0:
            return
        if out and out[-1][2] == depth and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, depth)
        else:
            out.append((offset, length, depth))

    with open_image(path, search_dirs=search_dirs) as img:
        images = img.chain()
        vsize = img.virtual_size
        bs = img.block_size
        fixed_depth = next((d for d, i in enumerate(images, 1) if i.is_fixed), 0)
        allocated = set()
        for i in images:
            if i.bat is not None:
                allocated.update(i.bat.allocated())
        for block in range(fmt.blocks_for(vsize, bs)):
            base = block * bs
            blen = min(bs, vsize - base)
            if block not in allocated:
                add(base, blen, fixed_depth if _fixed_covers(images, fixed_depth, base) else 0)
                continue
            nsec = -(-blen // fmt.SECTOR)
            wanted = fmt.sector_mask(0, nsec)
            pieces: list[tuple[int, int, int]] = []
            for depth, i in enumerate(images, 1):
                if not wanted:
                    break
                if i.is_fixed:
                    have = wanted
                else:
                    pos = i.block_pos(block)
                    if pos is None:
                        continue
                    have = wanted & i.bitmap(block, pos)
                pieces.extend((f, c, depth) for f, c in fmt.runs(have))
                wanted &= ~have
            pieces.extend((f, c, 0) for f, c in fmt.runs(wanted))
            for f, c, depth in sorted(pieces):
                add(base + f * fmt.SECTOR, min(c * fmt.SECTOR, blen - f * fmt.SECTOR), depth)
    return out


def _fixed_covers(images: list[ImageReader], depth: int, offset: int) -> bool:
    return depth > 0 and offset < images[depth - 1].virtual_size
