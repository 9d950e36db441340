#!/usr/bin/env python3
"""Build, or find in the cache, the kernel tier's Debian guest.

The guest is what a production host runs for the kernel paths: Debian 12's
stock kernel with lvm2 (device-mapper), open-iscsi (the kernel initiator),
nfs-common (the kernel NFS client), udev and python3. It is made only from
Debian packages, as root:

1. ``debootstrap --variant=minbase`` with those packages (the .debs are kept
   in ``<cache>/debs`` for the next build);
2. the kernel: ``linux-image-amd64``'s dependency, downloaded by the new
   root's own apt (the same mirror and lists as step 1), unpacked with
   ``dpkg -x``; modules a VM never loads (sound, GPU, wireless …) removed;
   ``depmod`` in the new root;
3. no systemd: ``/usr/sbin/smtest-init`` (below) is PID 1. It mounts the
   pseudo filesystems and runs the test agent from the shared checkout
   (``tests/kernel/guest/agent.py``), which starts udevd, iscsid and the
   network as named steps, then powers off;
4. an initramfs of busybox (from the guest's busybox-static) and the few
   modules needed to reach that init: virtio PCI, block and console, ext4,
   9p. Its ``/init`` mounts the root disk (the virtio disk with serial
   ``smtest-root``) and the checkout
   (9p tag ``smrepo``, read-only, at ``/repo``), then ``switch_root``;
5. the root filesystem as an ext4 image (``mkfs.ext4 -d``, no loop device).
   Boots use it with ``snapshot=on``, so every boot starts from the same
   state and the image is never written.

Result: ``<cache>/<key>/`` with ``vmlinux`` (the kernel's ELF image),
``initrd.img``, ``root.img`` and ``manifest.json``. ``<key>`` is the sha256
of this file: editing it (the package list, the inits, the mirror default)
builds a new image; after a build, images of other versions unused for
``UNUSED_FOR`` are removed (another clone may still boot them). The cache is
``$SM_GUEST_CACHE``, default ``/var/cache/smcommon-guest``, outside the
clone. One build at a time per cache (flock, bounded wait); a build killed
half way leaves only a ``.build-*`` directory that the next build removes.

Run by hand: ``python3 tests/kernel/build_guest.py`` prints the image
directory (building it if needed); ``--rebuild`` ignores the cache;
``--detach LOG`` builds in a process of its own session (niced, output to
LOG) and returns once it holds the cache lock: the tier's conftest starts
a cold build so while the rest of the suite runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("SM_GUEST_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("SM_GUEST_CACHE", "/var/cache/smcommon-guest"))
UNUSED_FOR = 6 * 3600.0  # seconds since an image was last used before it goes
LOCK_WAIT = 1800.0  # another build of the same cache: at most ~2 builds long
DETACH_WAIT = 10.0  # --detach: how long the caller waits for the lock to be taken
PACKAGES = [
    "lvm2",
    "open-iscsi",
    "nfs-common",
    "python3",
    "e2fsprogs",
    "udev",
    "kmod",
    "iproute2",
    "procps",
    "util-linux",
    "busybox-static",
    # every Debian host has it (priority important), minbase does not:
    # /etc/rpc, /etc/services (rpcinfo resolves "nfs", "mountd" there)
    "netbase",
]
# Modules a VM with virtio devices never loads: ~60% of the package's size.
PRUNE = [
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/iio",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/usb",
    "drivers/isdn",
    "drivers/bluetooth",
    "drivers/comedi",
    "drivers/mtd",
    "drivers/hwmon",
    "drivers/video",
    "drivers/hid",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "net/bluetooth",
    "net/wireless",
    "net/mac80211",
]
# What the initramfs loads, in order (each module's dependencies first, from
# modules.dep): enough to mount the root disk and the checkout.
INITRD_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
]
VERSIONS_OF = ["lvm2", "open-iscsi", "nfs-common", "udev", "python3", "e2fsprogs"]
REMOVE = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"]
ROOT_HEADROOM = 384 << 20  # free space in the root image for the guest's writes

INITRD_INIT = r"""#!/bin/busybox sh
# smtest initramfs: load the modules to reach the root disk and the checkout,
# mount them, hand over to /usr/sbin/smtest-init.
B=/bin/busybox
fail() { echo "smtest-initrd: $*"; $B sleep 1; $B poweroff -f; }
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.list); do
    $B insmod "/modules/$m" || echo "smtest-initrd: insmod $m failed"
done
# the root disk is the virtio disk with serial "smtest-root" (not always vda)
i=0
root=""
while [ -z "$root" ]; do
    for s in /sys/block/vd*/serial; do
        [ "$($B cat "$s" 2>/dev/null)" = smtest-root ] && root=${s%/serial} && root=/dev/${root##*/}
    done
    i=$((i + 1)); [ $i -gt 600 ] && fail "no virtio disk with serial smtest-root after 60 s"
    [ -n "$root" ] || $B sleep 0.1
done
$B mkdir -p /newroot
$B mount -t ext4 "$root" /newroot || fail "cannot mount $root"
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 smrepo /newroot/repo \
    || fail "cannot mount the checkout (9p tag smrepo)"
$B mount --move /dev /newroot/dev
$B umount /proc /sys
exec $B switch_root /newroot /usr/sbin/smtest-init
"""

SMTEST_INIT = r"""#!/bin/sh
# PID 1 of the kernel tier's guest: pseudo filesystems, then the test agent
# from the shared checkout; power off whatever happens.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o nosuid,nodev tmpfs /tmp
mkdir -p /dev/pts /dev/shm /run/lock
mount -t devpts -o gid=5,mode=0620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
hostname smguest
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root PYTHONDONTWRITEBYTECODE=1
python3 -u /repo/tests/kernel/guest/agent.py
echo "smtest-init: agent exited with status $?"
sync
busybox poweroff -f
"""


@dataclass(frozen=True)
class Guest:
    """A built guest: what a boot needs."""

    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str
    build_seconds: float  # of the build that made it
    built_now: bool  # False: found in the cache


def key() -> str:
    """The cache key: this file's content as it was when it was imported
    (an edit during a build must not file the image under the new key)."""
    return _KEY


_KEY = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def cached() -> bool:
    """The image for this script's content is in the cache."""
    return (CACHE / key() / "manifest.json").exists()


def ensure(
    log: Callable[[str], None] = print,
    rebuild: bool = False,
    on_locked: Callable[[], None] | None = None,
) -> Guest:
    """The cached guest for this script's content, built first if needed.
    ``on_locked`` is called once this process holds the cache lock (a build
    started afterwards by anyone else waits for this one)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    dest = CACHE / key()
    with _cache_lock(log):
        if on_locked is not None:
            on_locked()
        if not rebuild and (dest / "manifest.json").exists():
            os.utime(dest / "manifest.json")  # last used: now
            return _load(dest, built_now=False)
        _sweep(log)
        work = CACHE / f".build-{key()}-{os.getpid()}"
        started = time.monotonic()
        try:
            _build(work, log)
            manifest = json.loads((work / "manifest.json").read_text())
            manifest["build_seconds"] = round(time.monotonic() - started, 1)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if dest.exists():
                _remove(dest)
            work.rename(dest)
        finally:
            if work.exists():
                _remove(work)
        _prune_old(dest, log)
        return _load(dest, built_now=True)


def _load(dest: Path, built_now: bool) -> Guest:
    m = json.loads((dest / "manifest.json").read_text())
    return Guest(
        dir=dest,
        kernel=dest / "vmlinux",
        initrd=dest / "initrd.img",
        rootfs=dest / "root.img",
        kernel_version=m["kernel_version"],
        build_seconds=m["build_seconds"],
        built_now=built_now,
    )


class _cache_lock:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(CACHE / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT
        said = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise RuntimeError(
                        f"{CACHE}/.lock still held after {LOCK_WAIT:.0f} s "
                        "(another guest build?)"
                    ) from None
                if not said:
                    self.log(f"guest build: waiting for another build ({CACHE}/.lock)")
                    said = True
                time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _run(argv: list[str], timeout: float = 1200) -> str:
    """One build command; its output only when it fails."""
    r = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "HOME": "/root"},
    )
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
        raise RuntimeError(
            f"guest build: {' '.join(argv)} exited {r.returncode}:\n{tail}"
        )
    return r.stdout


def _build(work: Path, log: Callable[[str], None]) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("building the guest needs root (debootstrap, chroot)")
    work.mkdir()
    root = work / "root"
    debs = CACHE / "debs"
    debs.mkdir(exist_ok=True)

    def step(name: str, fn: Callable[[], object]) -> None:
        t = time.monotonic()
        fn()
        log(f"guest build: {name} {time.monotonic() - t:.1f} s")

    step(
        "debootstrap",
        lambda: _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--cache-dir={debs}",
                SUITE,
                str(root),
                MIRROR,
            ]
        ),
    )
    kver: list[str] = []
    step("kernel", lambda: kver.append(_install_kernel(root, work)))
    step("configure", lambda: _configure(root))
    step("initramfs", lambda: _initramfs(root, kver[0], work / "initrd.img"))
    versions = _run(["chroot", str(root), "dpkg-query", "-W", *VERSIONS_OF])
    step("root image", lambda: _root_image(root, work / "root.img"))
    _remove(root)
    manifest = {
        "key": key(),
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": PACKAGES,
        "kernel_version": kver[0],
        "versions": dict(line.split("\t", 1) for line in versions.splitlines()),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _install_kernel(root: Path, work: Path) -> str:
    """Debian's current kernel for the suite, from the new root's apt lists."""
    deps = _run(["chroot", str(root), "apt-cache", "depends", "linux-image-amd64"])
    names = [
        line.split(":", 1)[1].strip()
        for line in deps.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if len(names) != 1:
        raise RuntimeError(f"guest build: no kernel package in:\n{deps}")
    pkg = names[0]
    dl = root / "tmp" / "kernel"
    dl.mkdir()
    # apt's sandbox user cannot write to the chroot's /tmp/kernel: not an error
    _run(
        [
            "chroot",
            str(root),
            "sh",
            "-c",
            f"cd /tmp/kernel && apt-get -q download {pkg}",
        ]
    )
    deb = next(dl.glob("*.deb"))
    # not straight into the root: its /lib is a symlink (merged /usr) that
    # unpacking the package's lib/ directory would replace
    unpacked = work / "kernel-package"
    _run(["dpkg", "-x", str(deb), str(unpacked)])
    shutil.rmtree(dl)
    kver = pkg.removeprefix("linux-image-")
    bzimage = unpacked / "boot" / f"vmlinuz-{kver}"
    (work / "vmlinux").write_bytes(_vmlinux(bzimage.read_bytes()))
    (root / "usr" / "lib" / "modules").mkdir(exist_ok=True)
    shutil.move(
        unpacked / "lib" / "modules" / kver, root / "usr" / "lib" / "modules" / kver
    )
    shutil.rmtree(unpacked)
    mods = root / "usr" / "lib" / "modules" / kver / "kernel"
    for sub in PRUNE:
        if (mods / sub).exists():
            shutil.rmtree(mods / sub)
    _run(["chroot", str(root), "depmod", kver])
    return kver


def _vmlinux(bzimage: bytes) -> bytes:
    """The kernel's ELF image out of its bzImage: qemu boots it directly
    (PVH entry, CONFIG_PVH), which under TCG saves the ~10 s the bzImage
    spends in the BIOS and decompressing itself. Debian compresses with xz."""
    import lzma

    at = bzimage.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise RuntimeError("guest build: the kernel image holds no xz payload")
    elf = lzma.LZMADecompressor().decompress(bzimage[at:])
    if elf[:4] != b"\x7fELF":
        raise RuntimeError("guest build: the kernel's xz payload is not an ELF image")
    return elf


def _configure(root: Path) -> None:
    (root / "etc" / "hostname").write_text("smguest\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 smguest\n")
    (root / "repo").mkdir(exist_ok=True)
    init = root / "usr" / "sbin" / "smtest-init"
    init.write_text(SMTEST_INIT)
    init.chmod(0o755)
    if not (root / "etc" / "iscsi" / "initiatorname.iscsi").exists():
        raise RuntimeError("guest build: open-iscsi made no initiator name")
    for rel in REMOVE:
        shutil.rmtree(root / rel, ignore_errors=True)
    for d in (root / "var" / "cache" / "apt", root / "var" / "lib" / "apt" / "lists"):
        for p in d.glob("*"):
            if p.is_file():
                p.unlink()


def _module_closure(root: Path, kver: str) -> list[str]:
    """INITRD_MODULES and their dependencies, each after what it needs."""
    moddir = root / "lib" / "modules" / kver
    dep: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        dep[path] = needs.split()
        name = Path(path).name.removesuffix(".ko").replace("-", "_")
        by_name[name] = path
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for d in reversed(dep[path]):  # modules.dep lists the deepest last
            add(d)
        order.append(path)

    for name in INITRD_MODULES:
        if name not in by_name:
            raise RuntimeError(f"guest build: module {name} not in {kver}")
        add(by_name[name])
    return order


def _initramfs(root: Path, kver: str, out: Path) -> None:
    files: list[tuple[str, int, bytes]] = []  # (name, mode, content)
    dirs = ["bin", "dev", "proc", "sys", "newroot", "modules"]
    busybox = (root / "bin" / "busybox").read_bytes()
    files.append(("bin/busybox", 0o100755, busybox))
    files.append(("init", 0o100755, INITRD_INIT.encode()))
    mods = _module_closure(root, kver)
    moddir = root / "lib" / "modules" / kver
    for rel in mods:
        files.append(
            (f"modules/{Path(rel).name}", 0o100644, (moddir / rel).read_bytes())
        )
    listing = "\n".join(Path(rel).name for rel in mods) + "\n"
    files.append(("modules.list", 0o100644, listing.encode()))
    data = bytearray()
    ino = 1
    for d in dirs:
        data += _cpio_entry(d, 0o040755, b"", ino)
        ino += 1
    data += _cpio_entry("dev/console", 0o020600, b"", ino, rdev=(5, 1))
    ino += 1
    for name, mode, content in files:
        data += _cpio_entry(name, mode, content, ino)
        ino += 1
    data += _cpio_entry("TRAILER!!!", 0, b"", 0)
    out.write_bytes(gzip.compress(bytes(data), compresslevel=1))


def _cpio_entry(
    name: str, mode: int, content: bytes, ino: int, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    """One "newc" cpio member (what the kernel unpacks into its rootfs)."""
    nameb = name.encode() + b"\0"
    fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        len(content),
        0,
        0,
        rdev[0],
        rdev[1],
        len(nameb),
        0,
    ]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    pad1 = b"\0" * (-(len(head) + len(nameb)) % 4)
    pad2 = b"\0" * (-len(content) % 4)
    return head + nameb + pad1 + content + pad2


def _root_image(root: Path, out: Path) -> None:
    used = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                used += st.st_blocks * 512
    size = (int(used * 1.2) + ROOT_HEADROOM) // (1 << 20)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "smguest",
            "-d",
            str(root),
            str(out),
            f"{size}M",
        ]
    )


def _remove(path: Path) -> None:
    """Remove a build tree without crossing into anything mounted inside it
    (a killed debootstrap may leave /proc or /dev of the host there)."""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == str(path) or mnt.startswith(str(path) + "/"):
                mounts.append(mnt)
    for mnt in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _sweep(log: Callable[[str], None]) -> None:
    """Half-built trees of killed builds (the cache lock is ours)."""
    for p in CACHE.glob(".build-*"):
        log(f"guest build: removing {p} (a killed build)")
        _remove(p)


def _prune_old(keep: Path, log: Callable[[str], None]) -> None:
    """Images of other versions of this script, unused for UNUSED_FOR."""
    for p in CACHE.iterdir():
        manifest = p / "manifest.json"
        if p == keep or not manifest.exists():
            continue
        if time.time() - manifest.stat().st_mtime > UNUSED_FOR:
            log(f"guest build: removing {p} (unused for {UNUSED_FOR / 3600:.0f} h)")
            _remove(p)


def _detach(log_path: str) -> int:
    """``--detach LOG``: build in a process of its own session, not a child
    of the caller (the caller goes on, e.g. pytest running other tests);
    return once that process holds the cache lock, printing its pid, so that
    any later ensure() waits for its build instead of starting another."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        # another build may hold the lock (then ensure() waits for that one)
        ready, _, _ = select.select([r], [], [], DETACH_WAIT)
        said = os.read(r, 64).decode().strip() if ready else ""
        os.close(r)
        if ready and not said:
            print(
                f"guest build: the detached build stopped at once ({log_path})",
                file=sys.stderr,
            )
            return 1
        print(said or pid)
        return 0
    os.close(r)
    os.setsid()
    # stopped (pytest's run cut short): unwind, so the half-built tree and
    # what debootstrap mounted in it are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.suppress(OSError):
        os.nice(10)  # below the work that waits for nothing
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)

    def locked() -> None:
        os.write(w, f"{os.getpid()}\n".encode())
        os.close(w)

    code = 1
    try:
        t = time.monotonic()
        g = ensure(log=lambda s: print(s, flush=True), on_locked=locked)
        how = "built" if g.built_now else "cached"
        print(f"{how} in {time.monotonic() - t:.1f} s: {g.dir}", flush=True)
        code = 0
    except BaseException as e:  # noqa: BLE001 - a detached process: say it in its log
        print(f"guest build failed: {type(e).__name__}: {e}", flush=True)
    finally:
        sys.stdout.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    if "--detach" in argv:
        return _detach(argv[argv.index("--detach") + 1])
    rebuild = "--rebuild" in argv
    t = time.monotonic()
    g = ensure(log=lambda s: print(s, file=sys.stderr, flush=True), rebuild=rebuild)
    how = "built" if g.built_now else "cached"
    print(
        f"{how} in {time.monotonic() - t:.1f} s: kernel {g.kernel_version}",
        file=sys.stderr,
    )
    print(g.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
