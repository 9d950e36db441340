"""The VolumeStore seam: where the volumes (VHD images) of an SR live.

The engine names volumes (UUID strings) and never builds their paths: it asks
the store.  ``FileStore`` is the store of file SRs (ext, later nfs): a volume
is the file ``<sr dir>/<volume>.vhd``; all volumes of an SR sit in one
directory, so the relative parent locators a VHD child records stay valid.
``smcommon.lvhd.store.LVStore`` keeps the same methods over logical volumes.

Every image operation goes through ``smcommon.vhd`` (imported lazily, or the
module given to the store, which is how unit tests pass a fake).  The store
also owns a volume's *activation* on this host: for files, activation checks
that the whole chain opens (a missing or corrupt parent is reported before a
VM opens the disk); there is nothing to map.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from smcommon import ids
from smcommon.errors import BackendError, Error
from smcommon.fileio import fsync_dir
from smcommon.paths import safe_name
from smcommon.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # typing costs each plugin process ~3 ms to import

VHD_SUFFIX = ".vhd"
NEW_SUFFIX = ".vhd.new"
VHD_TMP_PREFIX = ".vhd-tmp-"  # smcommon.vhd.create's fallback temp names
VHD_TMP_RE = re.compile(r"\.vhd-tmp-[0-9a-f]{16}")
COPY_CHUNK = 8 * 1024 * 1024
CACHE_SETTLE_NS = 2_000_000_000
LIVE_LOCK_WAIT_ENV = "SM_LIVE_LOCK_WAIT"
LIVE_LOCK_WAIT = 1.0  # seconds to wait for an image lock before treating its holder as long-lived


def live_lock_wait() -> float:
    """How long the collector waits for an image's lock before it takes the
    holder for a running VM's backend and re-links without the lock
    (``$SM_LIVE_LOCK_WAIT`` seconds, default 1)."""
    try:
        return max(0.0, float(os.environ.get(LIVE_LOCK_WAIT_ENV, LIVE_LOCK_WAIT)))
    except ValueError:
        return LIVE_LOCK_WAIT

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@record(frozen=True)
class Node:
    """One volume of an SR's tree, as its VHD header says."""

    volume: str
    parent: str | None  # volume name of the parent, None for a base
    hidden: bool
    virtual_size: int
    physical_size: int


class VolumeStore(Protocol):
    def new_name(self) -> str: ...
    def path(self, volume: str) -> str: ...
    def exists(self, volume: str) -> bool: ...
    def volumes(self) -> list[str]: ...
    def entries(self) -> list[str]: ...
    def create(self, size: int, name: str | None = None) -> tuple[str, Any]: ...
    def snapshot(self, parent: str, name: str | None = None) -> str: ...
    def push_down(self, volume: str, base: str | None = None) -> str: ...
    def check_not_busy(self, volume: str) -> None: ...
    def busy(self, volume: str) -> bool: ...
    def stamp(self, volume: str) -> list[int] | None: ...
    def replace(self, src: str, dst: str) -> None: ...
    def renew(self, volume: str, parent: str) -> None: ...
    def rebase(self, volume: str, parent: str) -> None: ...
    def remove(self, volume: str) -> bool: ...
    def info(self, volume: str) -> Any: ...
    def node(self, volume: str) -> Node: ...
    def chain(self, volume: str) -> list[str]: ...
    def tree(self, strict: bool = False) -> dict[str, Node]: ...
    def physical_utilisation(self, volume: str) -> int: ...
    def set_hidden(self, volume: str, hidden: bool) -> None: ...
    def set_parent(self, child: str, parent: str, live_ok: bool = False) -> None: ...
    def coalesce(
        self, child: str, progress: Callable[[int, int], None] | None = None
    ) -> int: ...
    def resize(self, volume: str, size: int) -> Any: ...
    def convert_from(
        self, src_path: str, name: str | None = None
    ) -> tuple[str, Any]: ...
    def check(self, volume: str) -> list[str]: ...
    def held(
        self, volume: str, *, write: bool = False
    ) -> contextlib.AbstractContextManager[str]: ...
    def activate(self, volume: str, read_write: bool) -> None: ...
    def deactivate(self, volume: str) -> None: ...
    def space(self) -> tuple[int, int]: ...
    def cleanup_partial(self, owned: set[str]) -> list[str]: ...
    def shared_lock_dir(self) -> Path: ...


def load_vhd() -> Any:
    from smcommon import vhd

    return vhd


def vhd_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a vhd function; anything but a library error becomes Backend_error."""
    try:
        return fn(*args, **kwargs)
    except Error:
        raise
    except OSError as e:
        raise BackendError("VHD_IO_ERROR", [what, f"{e.strerror or e}"]) from None


class BaseStore:
    """What FileStore and LVStore (lvhd) share: ``busy`` from ``check_not_busy``."""

    def check_not_busy(self, volume: str) -> None:
        raise NotImplementedError

    def busy(self, volume: str) -> bool:
        """Whether a writer holds ``volume``'s image (its exclusive lock) now."""
        try:
            self.check_not_busy(volume)
        except BackendError:
            return True
        return False


class FileStore(BaseStore):
    """Volumes as ``<volume>.vhd`` files in one directory."""

    def __init__(self, sr_dir: Path, vhd: Any = None) -> None:
        self.sr_dir = Path(sr_dir)
        self._dir = str(self.sr_dir)
        self._vhd = vhd
        self._dirty: set[str] = set()  # volumes this process changed

    @property
    def vhd(self) -> Any:
        if self._vhd is None:
            self._vhd = load_vhd()
        return self._vhd

    # --- names and paths ---------------------------------------------------

    def new_name(self) -> str:
        return ids.new()

    def path(self, volume: str) -> str:
        return str(self.sr_dir / (safe_name("volume", volume) + VHD_SUFFIX))

    def exists(self, volume: str) -> bool:
        return os.path.exists(self.path(volume))

    def entries(self) -> list[str]:
        """Every name in the SR directory (volumes, temps, and foreign files)."""
        try:
            return sorted(os.listdir(self.sr_dir))
        except FileNotFoundError:
            return []

    def volumes(self) -> list[str]:
        """Names of the ``<name>.vhd`` files whose name can be a volume's."""
        return [
            n[: -len(VHD_SUFFIX)]
            for n in self.entries()
            if n.endswith(VHD_SUFFIX) and _NAME_RE.fullmatch(n[: -len(VHD_SUFFIX)])
        ]

    def shared_lock_dir(self) -> Path:
        """Where the SR's locks live: in the SR, seen by every host (engine/locks.py)."""
        from smcommon.engine.locks import shared_lock_dir

        return shared_lock_dir(self.sr_dir)

    def volume_of(self, path: str | None) -> str | None:
        """The volume name of an image path in this SR (None if elsewhere)."""
        if not path:
            return None
        p = Path(path)
        if p.parent.resolve() != self.sr_dir.resolve() or not p.name.endswith(
            VHD_SUFFIX
        ):
            return None
        return p.name[: -len(VHD_SUFFIX)]

    # --- images ------------------------------------------------------------

    def create(self, size: int, name: str | None = None) -> tuple[str, Any]:
        name = name or self.new_name()
        info = vhd_call("create", self.vhd.create, self.path(name), size)
        return name, info

    def snapshot(self, parent: str, name: str | None = None) -> str:
        """A new empty child of ``parent``.  Cost independent of the data."""
        name = name or self.new_name()
        vhd_call("snapshot", self.vhd.snapshot, self.path(parent), self.path(name))
        return name

    def push_down(self, volume: str, base: str | None = None) -> str:
        """Freeze ``volume``'s content as a new base; ``volume`` becomes its child.

        The volume keeps its name (so an attach_info path stays valid): its
        image gets a second name (a hard link, the base), an empty child of
        the base is written under a temp name, then renamed over the volume.
        A crash before the rename leaves the volume as it was plus an extra
        name nobody references (the collector removes the name, not the
        data); after it, the volume reads the base through its parent.
        """
        base = base or self.new_name()
        os.link(self.path(volume), self.path(base))
        fsync_dir(self.sr_dir)
        self.renew(volume, base)
        return base

    def check_not_busy(self, volume: str) -> None:
        """Refuse at once (VDI_IN_USE) if a writer holds ``volume``'s image open.

        A VM backend writing to the image holds smcommon.vhd's exclusive lock
        on it.  Freezing the image under a live writer would need the backend
        paused and re-pointed (tapdisk pause/unpause in the reference
        toolstack), which this store cannot do; without this probe the freeze
        would wait for the image lock and fail much later.
        """
        try:
            fd = os.open(self.path(volume), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendError(
                "VDI_IN_USE",
                [
                    (
                        f"volume {volume} is open for writing by a VM backend; a snapshot, "
                        "clone or compose of it needs the backend deactivated first"
                    )
                ],
            ) from None
        finally:
            os.close(fd)

    def stamp(self, volume: str) -> list[int] | None:
        """(inode, size, mtime, ctime) of the volume: any write changes it."""
        try:
            st = os.stat(self.path(volume))
        except FileNotFoundError:
            return None
        return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def replace(self, src: str, dst: str) -> None:
        """Rename volume ``src`` over volume ``dst`` (atomic).

        Done holding ``dst``'s exclusive image lock when it exists, so an
        open of ``dst`` racing the rename waits, then sees that the name now
        holds another file and opens that (``Image.open``).
        """
        from smcommon.vhd.locks import lock_file

        self._dirty.update((src, dst))
        fd = -1
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.path(dst), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if fd >= 0:
                vhd_call("lock", lock_file, fd, self.path(dst), exclusive=True)
            os.replace(self.path(src), self.path(dst))
            fsync_dir(self.sr_dir)
        finally:
            if fd >= 0:
                os.close(fd)

    def renew(self, volume: str, parent: str) -> None:
        """Replace ``volume`` by a new empty child of ``parent`` (one rename)."""
        self._dirty.add(volume)
        with self._replacement(volume, parent):
            pass

    @contextlib.contextmanager
    def _replacement(self, volume: str, parent: str) -> Iterator[str]:
        """A new empty child of ``parent`` under a temp name, to fill in the
        block; renamed over ``volume`` only when the block succeeds (a crash
        leaves the volume as it was, and the temp is dropped on next use)."""
        final = self.path(volume)
        tmp = final[: -len(VHD_SUFFIX)] + NEW_SUFFIX
        _drop_leftover(tmp)
        try:
            vhd_call("snapshot", self.vhd.snapshot, self.path(parent), tmp)
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.sr_dir)

    def rebase(self, volume: str, parent: str) -> None:
        """Put ``volume``'s own data over ``parent``'s content.

        A differencing volume is re-linked (``vhd.set_parent``): its own
        sectors stay, the rest now reads from ``parent``.  A volume without a
        parent has all its data as its own: its allocated extents are copied
        into a new child of ``parent`` written under a temp name, which is
        then renamed over the volume (a crash leaves the volume as it was).
        """
        vhd = self.vhd
        self._dirty.add(volume)
        if self.info(volume).parent:
            self.set_parent(volume, parent)
            return
        final = self.path(volume)
        with self._replacement(volume, parent) as tmp:
            for off, length, depth in vhd_call(
                "allocation_map", vhd.allocation_map, final
            ):
                if depth != 1:
                    continue
                end = off + length
                while off < end:
                    n = min(COPY_CHUNK, end - off)
                    vhd_call(
                        "write",
                        vhd.write,
                        tmp,
                        off,
                        vhd_call("read", vhd.read, final, off, n),
                    )
                    off += n

    def remove(self, volume: str) -> bool:
        path = Path(self.path(volume))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def info(self, volume: str) -> Any:
        return vhd_call("info", self.vhd.info, self.path(volume))

    def node(self, volume: str) -> Node:
        """What the volume's header says, read without its lock (a running
        VM's backend holds its images locked for as long as it runs)."""
        from smcommon.vhd.live import peek

        i = vhd_call("peek", peek, self.path(volume))
        return Node(
            volume=volume,
            parent=self.volume_of(i.parent),
            hidden=bool(i.hidden),
            virtual_size=int(i.virtual_size),
            physical_size=self.physical_utilisation(volume),
        )

    def tree(self, strict: bool = False) -> dict[str, Node]:
        """Every volume's node.

        Reading every VHD header costs ~1 ms a volume, so what the headers say
        (parent, hidden, virtual size) is cached in ``.sm/tree-cache.json``,
        keyed by the file's (inode, size, mtime, ctime).  A header change
        changes the ctime, but only by a clock tick: so entries whose ctime is
        less than CACHE_SETTLE seconds old are never cached (re-read each
        time), and volumes this process changed are re-read too.  With
        ``strict``, an unreadable volume raises instead of being skipped.
        """
        cache = self._load_cache()
        fresh: dict[str, list[Any]] = {}
        out: dict[str, Node] = {}
        now = time.time_ns()
        for v in self.volumes():
            try:
                st = os.stat(os.path.join(self._dir, v + VHD_SUFFIX))
            except FileNotFoundError:
                continue
            key = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            hit = cache.get(v)
            if hit is not None and hit[0] == key and v not in self._dirty:
                parent, hidden, vsize = hit[1], bool(hit[2]), int(hit[3])
            else:
                try:
                    n = self.node(v)
                except FileNotFoundError:
                    continue
                except Error:
                    if strict:
                        raise
                    continue
                parent, hidden, vsize = n.parent, n.hidden, n.virtual_size
            if now - st.st_ctime_ns > CACHE_SETTLE_NS:
                fresh[v] = [key, parent, hidden, vsize]
            out[v] = Node(v, parent, hidden, vsize, st.st_blocks * 512)
        self._dirty.clear()
        if fresh != cache:
            self._save_cache(fresh)
        return out

    def _cache_path(self) -> str:
        return os.path.join(self._dir, ".sm", "tree-cache.json")

    def _load_cache(self) -> dict[str, list[Any]]:
        try:
            with open(self._cache_path(), "rb") as f:
                doc = json.loads(f.read())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_cache(self, doc: dict[str, list[Any]]) -> None:
        path = self._cache_path()
        if not os.path.isdir(os.path.dirname(path)):
            return
        # a dot-name ending in .tmp: Metadata.cleanup_temp removes it if we die
        tmp = os.path.join(os.path.dirname(path), f".tree-cache.json.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(doc, separators=(",", ":")))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def chain(self, volume: str) -> list[str]:
        paths = vhd_call("chain", self.vhd.chain, self.path(volume))
        return [self.volume_of(p) or p for p in paths]

    def physical_utilisation(self, volume: str) -> int:
        """Bytes the leaf's file takes on disk (its chain is not counted)."""
        try:
            return os.stat(f"{self._dir}/{volume}{VHD_SUFFIX}").st_blocks * 512  # SR.scan: 10,000
        except FileNotFoundError:
            return 0

    def set_hidden(self, volume: str, hidden: bool) -> None:
        self._dirty.add(volume)
        vhd_call("set_hidden", self.vhd.set_hidden, self.path(volume), hidden)

    def set_parent(self, child: str, parent: str, live_ok: bool = False) -> None:
        """Re-link ``child`` to ``parent``.  With ``live_ok``, a child whose
        lock stays taken for ``live_lock_wait()`` seconds (a running VM's backend holds
        it) is re-linked without the lock (``vhd.live.set_parent_live``): the
        caller guarantees ``parent`` reads what the child's parent reads."""
        from smcommon.vhd.errors import Busy
        from smcommon.vhd.live import set_parent_live

        self._dirty.add(child)
        c, p = self.path(child), self.path(parent)
        if not live_ok:
            vhd_call("set_parent", self.vhd.set_parent, c, p)
            return
        try:
            vhd_call("set_parent", self.vhd.set_parent, c, p, lock_timeout=live_lock_wait())
        except Busy:
            vhd_call("set_parent_live", set_parent_live, c, p)

    def coalesce(
        self, child: str, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Copy ``child``'s sectors into its parent, which every reader reads
        through ``child`` (the collector's rule): the parent is written
        without its lock, so a running VM holding it is not waited for."""
        self._dirty.add(child)
        return int(
            vhd_call(
                "coalesce",
                self.vhd.coalesce,
                self.path(child),
                shadowed=True,
                on_batch=progress,
            )
        )

    def check(self, volume: str) -> list[str]:
        return list(vhd_call("check", self.vhd.check, self.path(volume)))

    def resize(self, volume: str, size: int) -> Any:
        self._dirty.add(volume)
        return vhd_call("resize", self.vhd.resize, self.path(volume), size)

    def convert_from(self, src_path: str, name: str | None = None) -> tuple[str, Any]:
        """A new volume holding the flattened content of the image ``src_path``.

        Written under a ``.vhd.new`` name and renamed when complete, so a
        crash never leaves a half-copied volume that looks like a real one.
        """
        name = name or self.new_name()
        final = self.path(name)
        tmp = final[: -len(VHD_SUFFIX)] + NEW_SUFFIX
        _drop_leftover(tmp)
        try:
            vhd_call("convert", self.vhd.convert, src_path, tmp)
            _fsync_file(tmp)
            os.rename(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.sr_dir)
        return name, self.info(name)

    def cleanup_partial(self, owned: set[str]) -> list[str]:
        """Remove ``<volume>.vhd.new`` files of owned volumes (copies killed
        midway), and the temp images (``.vhd-tmp-<16 hex>``) of killed VHD
        creates; the caller holds the SR lock, so none is being written."""
        gone = []
        for n in self.entries():
            if (
                n.endswith(NEW_SUFFIX) and n[: -len(NEW_SUFFIX)] in owned
            ) or VHD_TMP_RE.fullmatch(n):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.sr_dir / n)
                    gone.append(n)
        return gone

    # --- activation on this host ------------------------------------------

    @contextlib.contextmanager
    def held(self, volume: str, *, write: bool = False) -> Iterator[str]:
        """The image path of ``volume`` to open for the length of a block
        (a file is always there; a logical-volume store activates it);
        ``write``: the caller writes into it (a file's mtime shows it)."""
        yield self.path(volume)

    def activate(self, volume: str, read_write: bool) -> None:
        """Check that the whole chain of ``volume`` is there and sound."""
        for v in self.chain(volume):
            if not os.path.exists(self.path(v) if "/" not in v else v):
                raise BackendError(
                    "VHD_CHAIN_BROKEN", [f"{v} of the chain of {volume} is missing"]
                )
        problems = vhd_call("check", self.vhd.check, self.path(volume))
        if problems:
            raise BackendError("VHD_CORRUPT", [self.path(volume), *problems])
        if read_write and not os.access(self.path(volume), os.W_OK):
            raise BackendError("VHD_NOT_WRITABLE", [self.path(volume)])

    def deactivate(self, volume: str) -> None:
        """Flush what a writer left: fsync the leaf (a no-op if it is gone)."""
        with contextlib.suppress(FileNotFoundError):
            _fsync_file(self.path(volume))

    def space(self) -> tuple[int, int]:
        st = os.statvfs(self.sr_dir)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_leftover(tmp: str) -> None:
    """Remove a temp image a killed process left (callers hold the SR lock,
    so no live process owns it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
