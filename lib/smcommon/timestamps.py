"""The project's one timestamp format: the toolstack's ``20261125T16:02:03Z`` (UTC).

``now()`` to the second (snapshot_time, SR and collector records);
``now(precise=True)`` to the microsecond, for records that are ordered by
age ("oldest first" must not fall back on random keys for things made in the
same second).  Both sort as strings in time order.
"""

from __future__ import annotations

import time


def now(precise: bool = False) -> str:
    t = time.time()
    text = time.strftime("%Y%m%dT%H:%M:%S", time.gmtime(t))
    return f"{text}.{int(t % 1 * 1e6):06d}Z" if precise else text + "Z"
