"""Query.diagnostics: a readable report of this host's SRs.

For each attached SR: where it lives, its VDIs as trees of volumes (hidden
parents included), the active datapaths, and the garbage collector's state
(a pending journal, the last run's report).  Reading only: it takes no lock
and changes nothing, so it answers even while another call holds a lock.
"""

from __future__ import annotations

from pathlib import Path

from smcommon.errors import Error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from smcommon.engine.driver import Driver
    from smcommon.engine.sr import SrEngine


def report(driver: Driver) -> str:
    out = [f"{driver.type.name} SR driver; host root {driver.paths.root}"]
    backends = getattr(driver.type, "backend_diagnostics", None)
    if backends is not None:  # e.g. which iSCSI initiator and LV activation
        out += backends()
    entries = driver.registry.entries()
    out.append(f"SRs attached on this host: {len(entries)}")
    for entry in entries:
        out.append("")
        out.append(
            f"SR {entry.sr} ({entry.type}) at {entry.sr_dir}"
            + (" [mounted]" if entry.mounted else "")
            + f", attached {entry.attached}"
        )
        try:
            from smcommon.engine.sr import SrEngine

            eng = SrEngine(
                driver.paths,
                entry.sr,
                Path(entry.sr_dir),
                store=driver.store(entry.sr, Path(entry.sr_dir)),
                vhd=driver.vhd,
            )
            out += ["  " + line for line in sr_report(eng)]
        except (Error, OSError) as e:
            out.append(f"  unreadable: {e}")
    return "\n".join(out) + "\n"


def sr_report(eng: SrEngine) -> list[str]:
    from smcommon.engine import merge
    from smcommon.engine.gc import Collector

    out: list[str] = []
    recs, bad = eng.meta.all()
    total, free = eng.store.space()
    out.append(f"space: {free} bytes free of {total}")
    out.append(
        f"VDIs: {len(recs)}" + (f" ({len(bad)} unreadable records)" if bad else "")
    )
    out += [f"  unreadable: {b}" for b in bad]
    by_volume: dict[str, list[str]] = {}
    for r in recs:
        tag = f"VDI {r.vdi} {r.name_label!r}" + (
            "" if r.persistent else " non-persistent"
        )
        by_volume.setdefault(r.volume, []).append(tag)
        if r.epoch_base:
            by_volume.setdefault(r.epoch_base, []).append(f"epoch base of {r.vdi}")
    try:
        tree = eng.store.tree()
    except Error as e:
        out.append(f"tree: unreadable ({e})")
        tree = {}
    children: dict[str | None, list[str]] = {}
    for v, n in tree.items():
        children.setdefault(n.parent if n.parent in tree else None, []).append(v)
    out.append(
        f"volumes: {len(tree)} ({sum(1 for n in tree.values() if n.hidden)} hidden)"
    )

    owned = eng.owned.owned() | eng.needed_from(tree, recs)

    def walk(v: str, depth: int) -> None:
        n = tree[v]
        flags = "hidden" if n.hidden else "visible"
        kids = len(children.get(v, []))
        users = "; ".join(by_volume.get(v, [])) or (
            f"shared parent of {kids}" if kids else "unreferenced (garbage)"
        )
        if v not in owned:
            users = "foreign (not made by this SR): " + users
        out.append(
            f"{'  ' * (depth + 1)}{v} [{flags}, {n.physical_size} bytes]: {users}"
        )
        for c in sorted(children.get(v, [])):
            walk(c, depth + 1)

    for root in sorted(children.get(None, [])):
        walk(root, 0)
    active = eng.dps.active_vdis()
    out.append(f"active datapaths: {len(active)} VDIs")
    for vdi in active:
        states = ", ".join(
            f"{dp}={s.value}" for dp, s in sorted(eng.dps.states(vdi).items())
        )
        out.append(f"  {vdi}: {states}")
    out += _foreign(eng, tree)
    out += _collector(eng)
    col = Collector(eng)
    plan = merge.journal(eng)
    out.append(
        "gc journal: "
        + (
            f"pending {_short(plan.to_json())}"
            if plan
            else "none (no collection in progress)"
        )
    )
    last = col.last()
    if last:
        out.append(
            f"gc last run: {last.get('finished')} in {last.get('seconds')}s: "
            f"deleted {len(last.get('deleted', []))}, coalesced {len(last.get('coalesced', []))}, "
            f"hidden {len(last.get('hidden', []))}"
        )
        out += [f"  gc skipped: {s}" for s in last.get("skipped", [])]
        out += [f"  gc error: {s}" for s in last.get("errors", [])]
    else:
        out.append("gc last run: never")
    return out


def _foreign(eng: SrEngine, tree: dict[str, Any]) -> list[str]:
    from smcommon.engine import foreign

    if not eng.owned.ready():
        return [
            (
                "ownership: not recorded yet (an SR made by an earlier version: "
                "recorded at its next change)"
            )
        ]
    try:
        found = foreign.survey(eng, tree)
    except (Error, OSError) as e:
        return [f"foreign files: unreadable ({e})"]
    out = [f"foreign files (not made by this SR, never touched): {len(found)}"]
    for f in found:
        why = f.why or "a valid VHD: the next SR.scan adopts it as a VDI"
        out.append(f"  {f.name}: {why}")
    return out


def _collector(eng: SrEngine) -> list[str]:
    from smcommon.engine import collector

    doc = collector.progress_of(eng)
    if doc is None:
        if collector.idle(eng):
            return ["gc collector: idle (every request collected)"]
        return [
            "gc collector: not running (a request waits: the next change starts it)"
        ]
    done, total = int(doc.get("done", 0)), int(doc.get("total", 0))
    pct = f" ({100 * done // total}%)" if total else ""
    return [
        (
            f"gc collector: running (pid {doc.get('pid')} on {doc.get('host')}, "
            f"since {doc.get('started')})"
        ),
        f"  step: {doc.get('step')}",
        (
            f"  progress: {done} of {total} bytes{pct}, "
            f"{float(doc.get('rate', 0)) / 1e6:.1f} MB/s"
        ),
    ]


def _short(doc: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(doc.items()))


def space(eng: SrEngine) -> dict[str, Any]:
    """SR.stat: where the SR's bytes go, by what holds them (reading only).

    Every volume is counted once: a VDI's own volume, a hidden parent that
    VDIs share (epoch bases included), or garbage (needed by nothing, for the
    collector).  ``total`` is the SR.create's physical_size when one was
    given (file SRs report it; VDIs are thin, so it is not enforced), else
    the filesystem's size.
    """
    recs, _bad = eng.meta.all()
    tree = eng.store.tree()
    own = {r.volume for r in recs}
    parents = {n.parent for n in tree.values() if n.parent}
    used = {"vdi": 0, "parent": 0, "garbage": 0}
    count = dict.fromkeys(used, 0)
    for v, n in tree.items():
        kind = "vdi" if v in own else "parent" if v in parents else "garbage"
        used[kind] += n.physical_size
        count[kind] += 1
    fs_total, fs_free = eng.store.space()
    requested = int((eng.meta.read_sr() or {}).get("physical_size") or 0)
    total_used = sum(used.values())
    return {
        "sr": eng.sr,
        "total": requested or fs_total,
        "free": max(0, min(fs_free, requested - total_used)) if requested else fs_free,
        "used": total_used,
        "vdis": len(recs),
        "vdi_bytes": used["vdi"],
        "hidden_parents": count["parent"],
        "hidden_parent_bytes": used["parent"],
        "garbage_volumes": count["garbage"],
        "garbage_bytes": used["garbage"],
    }
