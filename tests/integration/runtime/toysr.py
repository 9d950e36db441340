#!/usr/bin/env python3
"""A toy SR plugin for the runtime's tests and bench: a tiny driver handed to
smcommon.plugin.main, exactly as plugins/<type>/<TYPE>SR do.

Behaviour by VDI key (VDI.stat / VDI.destroy): "missing" -> Vdi_does_not_exist;
"bug" -> an exception that is not an smcommon error; "noisy" -> prints to
stdout and runs a child that writes to stdout; "slow" -> sleeps 30 s;
"badresult" -> returns a value that does not fit vdi_info.  VDI.attach is not
implemented (Unimplemented).  SR.gc is an extra, non-SMAPI method.
"""

from __future__ import annotations

import os
import sys
import time
from typing import ClassVar

from smcommon import api, errors, plugin

GiB = 1 << 30

QUERY = {
    "driver": "toy",
    "name": "Toy SR",
    "description": "a static driver for the runtime tests",
    "vendor": "smcommon tests",
    "copyright": "(C) the authors",
    "version": "1.0",
    "required_api_version": "2.0",
    "features": ["VDI_CREATE", "VDI_DESTROY"],
    "configuration": {"path": "a directory"},
}


class ToyDriver:
    extra_methods: ClassVar[list[api.Method]] = [
        api.Method(
            "SR.gc", [api.Arg("sr", api.KEY, "the SR")], api.ANY, "collect garbage now"
        )
    ]

    def __init__(self, paths: object) -> None:
        self.paths = paths

    def query_query(self, dbg: str) -> dict[str, object]:
        return QUERY

    def query_diagnostics(self, dbg: str) -> str:
        return f"root={self.paths.root}\ndbg={dbg}\n"  # type: ignore[attr-defined]

    def sr_ls(self, dbg: str) -> list[str]:
        return ["sr1", "sr2"]

    def sr_gc(self, dbg: str, sr: str) -> dict[str, object]:
        return {"sr": sr, "deleted": 3, "bytes": 5 * GiB}

    def vdi_create(
        self, dbg: str, sr: str, vdi_info: dict[str, object]
    ) -> dict[str, object]:
        size = int(vdi_info["virtual_size"])  # type: ignore[call-overload]
        rounded = -(-size // (2 << 20)) * (2 << 20)
        return dict(
            vdi_info, vdi="v-" + str(vdi_info["name_label"]), virtual_size=rounded
        )

    def vdi_stat(self, dbg: str, sr: str, vdi: str) -> dict[str, object]:
        if vdi == "missing":
            raise errors.VdiDoesNotExist(vdi)
        if vdi == "bug":
            raise KeyError("no such thing")
        if vdi == "badresult":
            return {"vdi": vdi, "virtual_size": "lots"}
        return {
            "vdi": vdi,
            "name_label": "d0",
            "virtual_size": 10 * GiB,
            "sm_config": {"k": "v"},
        }

    def vdi_destroy(self, dbg: str, sr: str, vdi: str) -> None:
        if vdi == "noisy":
            print("stray output from the driver")
            os.system("echo stray output from a child")
        elif vdi == "slow":
            print("slow: sleeping", file=sys.stderr, flush=True)
            time.sleep(30)
        elif vdi == "bug":
            raise ZeroDivisionError("division by zero")


if __name__ == "__main__":
    plugin.main(ToyDriver)
