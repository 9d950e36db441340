"""Files in an SR's directory that the SR did not make: survey and adoption.

Operators copy VHDs into SR directories to bring disks in.  ``survey``
classifies every name in the directory that is neither the SR's metadata
(``.sm``), nor one of its volumes (``smcommon.engine.owned``), nor one of its
temp files; ``adopt`` (SR.scan) makes a new VDI of each *adoptable* one:

- a ``<uuid>.vhd`` (canonical lower-case UUID, not the key of a VDI) that
  ``vhd.check`` finds sound, whose whole chain opens from the SR directory
  (every parent is a volume file of the SR, sound too), which is not hidden,
  has no child, and no process holds locked for writing.

Everything else is left alone and reported (Query.diagnostics): a VHD with
another name, one whose parent lies outside the SR, a half-copied or corrupt
image, a hidden one, one that is the parent of another file, anything that
is not a VHD.

Adoption writes the VDI record first, then the ownership records of its
volumes: a kill in between leaves a VDI whose chain is owned anyway (the
engine counts every volume a record needs as owned), never an owned volume
without a record, which the collector would delete.
"""

from __future__ import annotations

import logging
import re

from smcommon import ids
from smcommon.engine.store import NEW_SUFFIX, VHD_SUFFIX, VHD_TMP_RE
from smcommon.errors import Error
from smcommon.record import record
from smcommon.vhd.errors import ParentMissing, ParentNotAllowed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from smcommon.engine.sr import SrEngine
    from smcommon.engine.store import Node

log = logging.getLogger(__name__)


@record(frozen=True)
class Foreign:
    """A name in the SR directory the SR did not make."""

    name: str
    why: str  # why it is not (or not yet) adopted; "" = adoptable
    volume: str | None = None  # the volume name of a <volume>.vhd file

    @property
    def adoptable(self) -> bool:
        return not self.why


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_uuid(text: str) -> bool:
    """A UUID in its canonical text form (lower case, dashed)."""
    return _UUID.fullmatch(text) is not None


def survey(eng: SrEngine, tree: dict[str, Node] | None = None) -> list[Foreign]:
    """Every foreign name of the SR directory, classified (reads headers and
    checks images: for SR.scan and diagnostics, not for hot paths)."""
    store = eng.store
    recs = eng.meta.records()
    if tree is None:
        tree = store.tree()
    owned = eng.owned.owned() | eng.needed_from(tree, recs)
    keys = {r.vdi for r in recs}
    volumes = set(store.volumes())
    children: dict[str, list[str]] = {}
    for v, n in tree.items():
        if n.parent is not None:
            children.setdefault(n.parent, []).append(v)
    out: list[Foreign] = []
    for name in store.entries():
        if name == ".sm" or VHD_TMP_RE.fullmatch(name):
            continue
        if name.endswith(NEW_SUFFIX) and name[: -len(NEW_SUFFIX)] in owned:
            continue
        vol = name[: -len(VHD_SUFFIX)] if name.endswith(VHD_SUFFIX) else None
        if vol is not None and vol in owned:
            continue
        if vol is None or vol not in volumes:
            out.append(Foreign(name, "not a VHD volume file of this SR"))
            continue
        out.append(
            Foreign(name, _why_not(eng, vol, tree, children, keys, volumes), vol)
        )
    return out


def _why_not(
    eng: SrEngine,
    vol: str,
    tree: dict[str, Node],
    children: dict[str, list[str]],
    keys: set[str],
    volumes: set[str],
) -> str:
    store = eng.store
    node = tree.get(vol)
    if node is None:
        try:
            store.node(vol)
        except (ParentMissing, ParentNotAllowed) as e:
            return f"its parent lies outside the SR or is missing: {e}"
        except Error as e:
            return f"unreadable, corrupt or half-copied VHD: {e}"
        return "changed while it was read"
    if not _is_uuid(vol):
        return "a VHD not named <uuid>.vhd (rename it to adopt it)"
    if vol in keys:
        return "named after the key of an existing VDI"
    if node.hidden:
        return "hidden (a parent image, not a disk)"
    if children.get(vol):
        return f"the parent of {', '.join(sorted(children[vol]))}"
    if store.busy(vol):
        return "held open for writing by another process"
    try:
        chain = store.chain(vol)
    except Error as e:
        return f"its parent chain does not open inside the SR (outside or missing): {e}"
    for v in chain:
        if v not in volumes:
            return f"its parent {v} lies outside the SR"
    for v in chain:
        try:
            problems = store.check(v)
        except Error as e:
            problems = [str(e)]
        if problems:
            what = "it" if v == vol else f"its parent {v}"
            return f"{what} is corrupt or half-copied: {'; '.join(problems[:3])}"
    return ""


def adopt(eng: SrEngine) -> list[str]:
    """SR.scan: make a VDI of each adoptable foreign VHD (caller holds the SR
    lock); the new VDI keys."""
    from smcommon import timestamps
    from smcommon.engine.meta import VdiRecord

    tree = eng.store.tree()
    done: list[str] = []
    for f in survey(eng, tree):
        if not f.adoptable or f.volume is None:
            continue
        vol = f.volume
        chain = eng.store.chain(vol)
        info = eng.store.info(vol)
        rec = VdiRecord(
            vdi=vol,
            volume=vol,
            name_label=f.name,
            name_description="adopted by SR.scan: a VHD found in the SR",
            content_id=ids.new(),
            virtual_size=int(info.virtual_size),
            sm_config={"vdi_type": "vhd"},
            created=timestamps.now(precise=True),
        )
        eng.put(rec, f"saving the record of adopted VDI {vol}")
        eng.new_volumes(*chain)
        log.info("SR.scan adopted %s as VDI %s (chain %s)", f.name, vol, chain)
        done.append(vol)
    return done


def has_candidates(eng: SrEngine) -> bool:
    """Cheap: is there a ``<uuid>.vhd`` the SR does not own (maybe adoptable)?"""
    if not eng.owned.ready():
        return True
    owned = eng.owned.owned()
    return any(_is_uuid(v) for v in eng.store.volumes() if v not in owned)
