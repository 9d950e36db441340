"""What is specific to the ext SR type: storage preparation and Query.query.

device_config (one of):
  device   a block device: SR.create runs mkfs.ext4 on it; SR.attach mounts it
           at ``Paths.sr_mount(sr)``; SR.detach unmounts; SR.destroy wipes
           the filesystem signature (wipefs) so it is not found again.
           Refused when it, a partition or a holder is mounted, and on
           SR.create when it holds a filesystem, an LVM PV, a partition
           table or partitions, unless ``force=true`` (``smcommon.devsafety``).
  path     a directory used as it is (the unprivileged, embedded form): the
           SR's volumes and metadata live in it; SR.create makes it (and its
           parents) when it does not exist.  Only under the host's SR roots
           (``SM_SR_PATHS``; symlinks resolved), never in the host's own
           state, run, log or configuration directories (``smcommon.devsafety``).
  force    ``true``: SR.create formats a device that holds something.
No device_config key of ext is secret (``SECRET_KEYS``).

This module is imported by every call of EXTSR, so it imports nothing heavy:
``factory`` returns the engine's small ``SrPlugin``, which answers Query.query
itself and hands every other method to the engine's ``Driver``, imported only then.
Outside commands go through ``smcommon.runner.run`` (argv lists, timeouts);
mounting and the mount table are ``smcommon.mount``'s.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from smcommon.engine.front import SrPlugin
    from smcommon.paths import Paths

DRIVER = "ext"
# What a call may import, imported once by the dispatcher's warm parent of this
# plugin (dispatcher/zygote.py); a direct run imports only what its method needs.
WARM_IMPORTS = [
    "smcommon.engine.front",
    "smcommon.mount",
    "smcommon.devsafety",
]
_NEEDS = "device_config needs exactly one of 'device' (a block device) or 'path' (a directory)"
VERSION = "0.1.0"
MKFS_TIMEOUT = 600.0
MOUNT_TIMEOUT = 120.0

CONFIGURATION = {
    "device": "a block device to format as ext4 and mount (needs root); SR.create "
    "refuses one that is mounted or holds a filesystem, an LVM PV or partitions",
    "path": "a directory to hold the SR as it is (no root needed), under one of the "
    "host's SR roots (SM_SR_PATHS); SR.create makes it if it does not exist",
    "force": "true: SR.create formats the device even if it holds something, "
    "destroying it (never one in use)",
}
SECRET_KEYS: frozenset[str] = frozenset()  # none of ext's keys holds a secret
FEATURES = [
    "SR_ATTACH",
    "SR_DETACH",
    "SR_CREATE",
    "SR_DESTROY",
    "SR_RESET",
    "SR_SCAN",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_ATTACH",
    "VDI_DETACH",
    "VDI_ACTIVATE",
    "VDI_DEACTIVATE",
    "VDI_SNAPSHOT",
    "VDI_CLONE",
    "VDI_RESET_ON_BOOT/2",
    "VDI_COMPOSE",
    "VDI_COPY",
    "VDI_GET_URL",
    "SR_GC",
    "THIN_PROVISIONING",
]


def query_result() -> dict[str, object]:
    return {
        "driver": DRIVER,
        "name": "ext",
        "description": "VHD images on a local ext4 filesystem (a block device) or a directory",
        "vendor": "smcommon",
        "copyright": "LGPL-2.1-only",
        "version": VERSION,
        "required_api_version": "2.0",
        "features": list(FEATURES),
        "configuration": dict(CONFIGURATION),
    }


class ExtType:
    """The engine's SrType for ext: prepare, release and wipe the storage."""

    name = DRIVER
    keys = frozenset(CONFIGURATION)
    secret_keys = SECRET_KEYS

    def __init__(self, paths: Paths, runner: Any = None) -> None:
        self.paths = paths
        self._runner = runner

    def run(self, argv: list[str], **kw: Any) -> Any:
        if self._runner is None:
            from smcommon.runner import run

            self._runner = run
        return self._runner(argv, **kw)

    def query(self) -> dict[str, object]:
        return query_result()

    @staticmethod
    def _which(device_config: dict[str, str]) -> tuple[str, str]:
        from smcommon.errors import BackendError

        keys = [k for k in ("device", "path") if device_config.get(k)]
        if len(keys) != 1:
            raise BackendError(
                "DEVICE_CONFIG_INVALID",
                [_NEEDS + f"; got {sorted(device_config)}"],
            )
        value = device_config[keys[0]]
        if not os.path.isabs(value) or "\x00" in value:
            raise BackendError(
                "DEVICE_CONFIG_INVALID",
                [f"{keys[0]} must be an absolute path: {value!r}"],
            )
        return keys[0], value

    def open(
        self, sr: str, device_config: dict[str, str], create: bool
    ) -> tuple[Path, bool]:
        from pathlib import Path

        from smcommon import devsafety, mount
        from smcommon.errors import BackendError

        kind, value = self._which(device_config)
        if kind == "path":
            reserved = devsafety.host_dirs(self.paths)
            value = str(devsafety.allowed_path(value, reserved=reserved))
            if create and not os.path.lexists(value):
                try:
                    os.makedirs(value, mode=0o755)
                except OSError as e:
                    raise BackendError(
                        "PATH_NOT_CREATED", [f"cannot create {value}: {e.strerror}"]
                    ) from None
            if not os.path.isdir(value):
                raise BackendError(
                    "PATH_NOT_FOUND",
                    [
                        f"{value} is not an existing directory"
                        + ("" if create else " (SR.create makes it: mistyped, or destroyed?)")
                    ],
                )
            return Path(os.path.realpath(value)), False
        self._check_block_device(value)
        mnt = self.paths.sr_mount(sr)
        entry = mount.mounted_at(str(mnt))
        current = entry.source if entry is not None else None
        if current is not None:
            if os.path.realpath(current) != os.path.realpath(value):
                raise BackendError(
                    "SR_MOUNTED", [f"{mnt} holds {current}, not {value}"]
                )
            if not create:
                return mnt, True
            # SR.create is only reached for an SR not attached here: this
            # mount is the leftover of a killed SR.create; undo it first.
            self.close(sr, mnt, True)
        devsafety.check_device(value, create, devsafety.forced(device_config), self.run)
        if create:
            self.run(
                ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", value],
                timeout=MKFS_TIMEOUT,
            )
        mnt.mkdir(parents=True, exist_ok=True)
        try:
            mount.mount(
                value, str(mnt), fstype="ext4", runner=self.run, timeout=MOUNT_TIMEOUT
            )
        except mount.MountFailed as e:
            try:
                os.rmdir(mnt)
            except OSError:
                pass
            raise BackendError(
                "MOUNT_FAILED",
                [
                    f"{value} holds no mountable ext4 (never created, or destroyed?)",
                    *e.details,
                ],
            ) from None
        return mnt, True

    @staticmethod
    def _check_block_device(value: str) -> None:
        import stat

        from smcommon.errors import BackendError

        try:
            st = os.stat(value)
        except OSError as e:
            raise BackendError("DEVICE_NOT_FOUND", [f"{value}: {e.strerror}"]) from None
        if not stat.S_ISBLK(st.st_mode):
            raise BackendError("NOT_A_BLOCK_DEVICE", [f"{value} is not a block device"])

    def close(self, sr: str, sr_dir: Path, mounted: bool) -> None:
        from smcommon import mount

        if not mounted or mount.mounted_at(str(sr_dir)) is None:
            return
        os.sync()
        mount.umount(str(sr_dir), runner=self.run, timeout=MOUNT_TIMEOUT)
        try:
            os.rmdir(sr_dir)
        except OSError:
            pass

    def wipe(self, sr: str, device_config: dict[str, str]) -> None:
        """Make a destroyed SR unprobeable: erase the filesystem signature."""
        device = device_config.get("device")
        if device:
            self.run(["wipefs", "-a", "-q", device], timeout=MOUNT_TIMEOUT)


def factory(paths: Paths) -> SrPlugin:
    """What plugin.main calls: Query.query here, the rest in the engine."""
    from smcommon.engine.front import SrPlugin

    return SrPlugin(paths, ExtType(paths))


driver_factory = factory  # the name bench/plugin_bench.py looks for
