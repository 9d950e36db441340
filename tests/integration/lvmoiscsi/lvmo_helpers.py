"""Helpers of the lvmoiscsi black-box tests: the real plugins/lvmoiscsi/LVMoISCSISR
against a real tgtd target, carried by the userspace initiator (qemu-storage-daemon,
FUSE, loop devices) and real lvm2, on this machine whose kernel has neither an
iSCSI initiator nor device-mapper.

Every call is a new process of the real executable, as in the ext tests (the
``Ext``/``SR`` helpers are reused); what differs is how the tests look at the
storage: ``lvs`` through the SR's own private lvm configuration, and the VHD
chains read through attached, activated VDIs (LVs have no files to list).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXT = HERE.parent / "ext"
for p in (str(HERE), str(EXT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import itertools

from ext_helpers import BLOCK, SR, Ext, MiB
from tgtd import Target, Tgtd

REPO = Path(__file__).resolve().parents[3]
PLUGIN = REPO / "plugins" / "lvmoiscsi" / "LVMoISCSISR"
K4 = 4096

__all__ = ["BLOCK", "K4", "Lvmo", "LvmoSR", "MiB", "device_config", "pat"]


def pat(tag: str, n: int = K4) -> bytes:
    raw = (tag.encode() + b".") * (n // (len(tag) + 1) + 1)
    return raw[:n]


class Lvmo(Ext):
    """The real LVMoISCSISR executable on one SM_ROOT."""

    def __init__(self, root: Path, dbg: str = "itest", backend: Any = None) -> None:
        super().__init__(root, dbg=dbg, plugin=PLUGIN, sr_type="lvmoiscsi", backend=backend)


def device_config(tgtd: Tgtd, t: Target, **extra: str) -> dict[str, str]:
    dc = {
        "target": "127.0.0.1",
        "port": str(tgtd.port),
        "targetIQN": t.iqn,
        "SCSIid": t.scsi_id,
        "chapuser": t.user,
        "chappassword": t.password,
    }
    dc.update(extra)
    return {k: v for k, v in dc.items() if v is not None}


class LvmoSR(SR):
    """An attached lvmoiscsi SR and the checks of its LVs and chains."""

    def __init__(self, ext: Ext, uuid_: str, config: dict[str, str], target: Target) -> None:
        super().__init__(ext, uuid_, "iscsi",
                         ext.root / "run" / "sm" / "sr-mount" / uuid_, config)
        self.target = target

    @property
    def vg(self) -> str:
        return "VG_XenStorage-" + self.uuid

    @property
    def state_dir(self) -> Path:
        return self.ext.root / "run" / "sm" / "lvmoiscsi" / self.uuid

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.state_dir / "state.json").read_text()))

    def read(self, vdi: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """An LV is readable only while activated: read as a VM would."""
        return self.read_attached(vdi, ranges)

    def lvs(self) -> dict[str, int]:
        """LV name -> size, from the real lvs through the SR's private configuration."""
        p = subprocess.run(
            ["lvs", "--reportformat", "json", "-o", "lv_name,lv_size", "--units", "b",
             "--nosuffix", self.vg],
            capture_output=True, text=True, timeout=60, check=False,
            env=dict(os.environ, LVM_SYSTEM_DIR=str(self.state_dir / "lvm"),
                     LVM_SUPPRESS_FD_WARNINGS="1"),
        )
        assert p.returncode == 0, p.stderr
        rows = json.loads(p.stdout)["report"][0]["lv"]
        return {r["lv_name"]: int(r["lv_size"]) for r in rows}

    def vg_tags(self) -> list[str]:
        p = subprocess.run(
            ["vgs", "--reportformat", "json", "-o", "vg_tags", self.vg],
            capture_output=True, text=True, timeout=60, check=False,
            env=dict(os.environ, LVM_SYSTEM_DIR=str(self.state_dir / "lvm"),
                     LVM_SUPPRESS_FD_WARNINGS="1"),
        )
        assert p.returncode == 0, p.stderr
        text = json.loads(p.stdout)["report"][0]["vg"][0]["vg_tags"]
        return [t for t in text.split(",") if t]

    def lvm(self, *argv: str) -> str:
        """Run a real lvm2 command through the SR's private configuration (what
        someone else on the host could do to the VG); its output."""
        p = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=120, check=False,
            env=dict(os.environ, LVM_SYSTEM_DIR=str(self.state_dir / "lvm"),
                     LVM_SUPPRESS_FD_WARNINGS="1"),
        )
        assert p.returncode == 0, f"{argv}: {p.stderr}"
        return p.stdout

    @contextlib.contextmanager
    def lv_device(self, lv: str, writable: bool = False) -> Iterator[str]:
        """A loop device of the test's own over one LV's extents on the PV
        (one segment), detached at the end."""
        st = self.state()
        out = self.lvm("lvs", "--reportformat", "json", "-o", "lv_size,seg_start_pe,devices",
                       "--units", "b", "--nosuffix", f"{self.vg}/{lv}")
        (row,) = json.loads(out)["report"][0]["lv"]
        assert row["seg_start_pe"] == "0" and "," not in row["devices"], row
        pe = int(row["devices"].split("(")[1].rstrip(")"))
        argv = ["losetup", "--find", "--show", "--offset",
                str(st["pe_start"] + pe * st["extent"]), "--sizelimit", row["lv_size"]]
        if not writable:
            argv.append("--read-only")
        dev = subprocess.run([*argv, st["pv"]], capture_output=True, text=True,
                             check=True).stdout.strip()
        try:
            yield dev
        finally:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)

    def image_dir(self) -> Path:
        """Where the attach_info paths of this SR's VDIs are (symlinks to devices)."""
        return self.ext.root / "run" / "sm" / "lvhd" / self.uuid / "dev"

    def holds_image(self, path: str) -> bool:
        return Path(os.path.abspath(path)).parent == self.image_dir()

    def vhd_files(self) -> dict[Path, Any]:
        """Every VHD LV of the SR, read-only through loop devices the test makes
        over the LVs' extents (black-box: lvs of the SR's private configuration,
        the PV's extent layout); the paths are gone when this returns."""
        import shutil
        import tempfile

        from smcommon import vhd

        st = self.state()
        env = dict(os.environ, LVM_SYSTEM_DIR=str(self.state_dir / "lvm"),
                   LVM_SUPPRESS_FD_WARNINGS="1")
        p = subprocess.run(
            ["lvs", "--reportformat", "json", "-o",
             "lv_name,lv_size,seg_start_pe,devices", "--units", "b", "--nosuffix", self.vg],
            capture_output=True, text=True, timeout=60, check=True, env=env)
        rows = [r for r in json.loads(p.stdout)["report"][0]["lv"]
                if r["lv_name"].startswith("VHD-")]
        d = Path(tempfile.mkdtemp(dir=self.ext.root))
        loops = []
        try:
            for r in rows:
                assert r["seg_start_pe"] == "0" and "," not in r["devices"], r
                pe = int(r["devices"].split("(")[1].rstrip(")"))
                off = st["pe_start"] + pe * st["extent"]
                dev = subprocess.run(
                    ["losetup", "--find", "--show", "--read-only", "--offset", str(off),
                     "--sizelimit", r["lv_size"], st["pv"]],
                    capture_output=True, text=True, check=True).stdout.strip()
                loops.append(dev)
                (d / r["lv_name"][4:]).symlink_to(dev)
            return {d / r["lv_name"][4:]: vhd.info(str(d / r["lv_name"][4:])) for r in rows}
        finally:
            for dev in loops:
                subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
            shutil.rmtree(d, ignore_errors=True)

    def chain(self, vdi: str) -> list[str]:
        """The volumes of a VDI's chain, leaf first, read through its activated image."""
        from smcommon import vhd

        with self.opened(vdi) as path:
            problems = vhd.check(path)
            assert problems == [], f"vhd.check of VDI {vdi}: {problems}"
            infos = []
            for p in vhd.chain(path):
                infos.append((os.path.basename(p), vhd.info(p).hidden))
        leaf_hidden = infos[0][1]
        assert not leaf_hidden, f"VDI {vdi}: its leaf is hidden"
        assert all(h for _, h in infos[1:]), f"VDI {vdi}: a parent is not hidden: {infos}"
        return [v for v, _ in infos]

    def assert_consistent(self, *, after_gc: bool = False) -> dict[str, dict[str, Any]]:
        """SR.scan and VDI.stat agree; every VDI's chain is sound; and (after a
        collection) the LVs are exactly the MGT volume and the VDIs' chains."""
        scan = self.scan()
        for key, info in list(scan.items())[:8]:
            st = self.ok("VDI.stat", vdi=key)
            assert int(st["virtual_size"]) == int(info["virtual_size"])
        chains = {key: self.chain(key) for key in scan}
        leaves = [c[0] for c in chains.values()]
        assert len(set(leaves)) == len(leaves), f"two VDIs share a leaf: {chains}"
        kids: dict[str, set[str]] = {}
        for c in chains.values():
            for child, parent in itertools.pairwise(c):
                kids.setdefault(parent, set()).add(child)
        if after_gc:
            want = {"MGT"} | {"VHD-" + v for c in chains.values() for v in c}
            got = set(self.lvs())
            assert got == want, (f"LVs leaked: {sorted(got - want)}; missing: "
                                 f"{sorted(want - got)}")
            # a non-persistent VDI's frozen content (its epoch base) is kept even
            # with a single child: the leaf of that VDI
            np_bases = {c[1] for k, c in chains.items()
                        if not scan[k]["persistent"] and len(c) > 1}
            single = [p for p, k in kids.items() if len(k) == 1 and p not in np_bases]
            assert not single, f"hidden volumes with a single child after SR.gc: {single}"
        return scan

    def assert_no_leaks(self) -> None:
        self.ok("SR.gc")
        self.assert_consistent(after_gc=True)


def make_sr(ext: Lvmo, tgtd: Tgtd, t: Target, **extra: str) -> LvmoSR:
    sr_uuid = str(uuid.uuid4())
    dc = device_config(tgtd, t, **extra)
    ext.ok("SR.create", sr=sr_uuid, device_config=dc, physical_size="0")
    ext.ok("SR.attach", sr=sr_uuid, device_config=dc)
    return LvmoSR(ext, sr_uuid, dc, t)


def _loops() -> list[dict[str, Any]]:
    """The host's loop devices (losetup's name, back-file, autoclear)."""
    p = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE,AUTOCLEAR"],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    return list(json.loads(p.stdout)["loopdevices"])


def _released(loop: dict[str, Any]) -> bool:
    """Detached while something else held it (another test's new mount
    namespace copies the mounts of the moment): only marked autoclear; the
    kernel frees it with its last user."""
    return loop.get("autoclear") in (True, 1, "1")


def loops_of(backing_prefixes: list[str]) -> list[str]:
    """Loop devices over these backing files still attached (a released one
    is not counted)."""
    out = []
    for r in _loops():
        back = str(r.get("back-file") or "")
        if not _released(r) and any(back.startswith(pfx) for pfx in backing_prefixes):
            out.append(f"{r['name']} -> {back}")
    return out


def detach_and_check(sr: LvmoSR) -> None:
    """SR.detach leaves nothing of the SR on this host: no loop device, no
    qemu-storage-daemon, no mount."""
    try:
        st = sr.state()
    except OSError:
        st = {}
    backing = [x for x in (st.get("pv"), st.get("lun", {}).get("fuse")) if x]
    r = sr.ext.call("SR.detach", sr=sr.uuid)
    assert r.ok, r.describe()
    left = loops_of(backing)
    assert not left, f"loop devices left after SR.detach: {left}"
    with open("/proc/self/mounts") as f:
        mounts = [ln.split()[1] for ln in f if str(sr.ext.root) in ln and sr.uuid in ln]
    assert not mounts, f"mounts left after SR.detach: {mounts}"
    assert not sr.state_dir.exists(), f"{sr.state_dir} left after SR.detach"


def force_cleanup(root: Path) -> list[str]:
    """Tear down by hand what an SR under ``root`` left (a failed test): mounts
    (deepest first), qemu-storage-daemons with that SM_ROOT, loop devices over
    their FUSE files and over those loops.  Returns what was done."""
    import signal

    import psutil

    done = []
    with open("/proc/self/mounts") as f:
        mounts = [ln.split()[1].replace("\\040", " ") for ln in f]
    for mnt in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        done.append(f"umount {mnt}")
    for proc in psutil.process_iter(["pid", "name", "environ"]):
        try:
            if proc.info["name"] == "qemu-storage-daemon" and \
                    (proc.info.get("environ") or {}).get("SM_ROOT") == str(root):
                proc.send_signal(signal.SIGKILL)
                done.append(f"killed qemu-storage-daemon {proc.pid}")
        except psutil.Error:
            pass
    rows = _loops()
    # the PV loops over this root's files, released or not: a loop left over a
    # released PV loop holds it, and with it the LUN, for good
    pvs = {r["name"] for r in rows if str(r.get("back-file") or "").startswith(str(root))}
    held = [r for r in rows if not _released(r)]
    for r in held:
        if str(r.get("back-file") or "") in pvs:
            subprocess.run(["losetup", "-d", r["name"]], capture_output=True, check=False)
            done.append(f"losetup -d {r['name']} (over {r['back-file']})")
    for r in held:
        if r["name"] in pvs:
            subprocess.run(["losetup", "-d", r["name"]], capture_output=True, check=False)
            done.append(f"losetup -d {r['name']}")
    return done
