"""What a plugin executable hands to ``smcommon.plugin.main``: one per call.

``SrPlugin(paths, sr_type)`` answers Query.query from the SR type itself and
hands every other method to the engine's ``Driver`` (``smcommon.engine.driver``),
imported only then: a plugin run for Query.query imports nothing of the engine.
A type that checks something before each call (NFSSR probes its server)
subclasses it.
"""

from __future__ import annotations

# What the engine's calls import, imported once by a plugin's warm parent
# (dispatcher/zygote.py follows the WARM_IMPORTS of what it imports); a direct
# run imports only what its method needs.  A module a call imports that is not
# here is imported again by every call (tests/integration/dispatcher/
# test_warm_imports.py).  Not here: ``smcommon.engine.remote`` (VDI.copy to
# another SR, VDI.import_raw), whose http.client and ssl made the warm parent
# 22 -> 16 MiB, a size every call's fork and exit pay for (a warm Query.query
# 2.9 -> 2.5 ms, A/B), while the calls that import it move a disk's data.
WARM_IMPORTS = [
    "smcommon.engine.driver",
    "smcommon.engine.datapath",
    "smcommon.engine.collector",
    "smcommon.engine.foreign",
    "smcommon.engine.gc",
    "smcommon.engine.diagnostics",
    "smcommon.runner",
    "smcommon.vhd",
    "smcommon.vhd.live",
]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from smcommon.engine.driver import SrType
    from smcommon.paths import Paths


class SrPlugin:
    """Query.query here, the rest in the engine."""

    def __init__(self, paths: Paths, sr_type: SrType) -> None:
        self.paths = paths
        self.sr_type = sr_type
        self.secret_keys = sr_type.secret_keys
        self._driver: Any = None

    def query_query(self, dbg: str) -> dict[str, object]:
        return self.sr_type.query()

    def driver(self) -> Any:
        if self._driver is None:
            from smcommon.engine.driver import Driver

            self._driver = Driver(self.paths, self.sr_type)
        return self._driver

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.driver(), name)
