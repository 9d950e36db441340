"""Which peer may send a VDI's data: the one whose VDI.create made it.

A remote VDI.copy is two requests from the sending host: ``VDI.create`` (an
XML-RPC call) then ``PUT /data/<sr>/<vdi>`` (``dispatcher.upload``).  Owns
``Grants``: the dispatcher records the caller's name (its certificate name
over mutual TLS, ``dispatcher.httpd``) for every VDI a TCP caller created;
an upload is taken only from that same name, once, within ``ttl`` seconds.
Callers on the Unix socket get no grant: uploads come from peers.  Grants
live in memory: a restarted dispatcher refuses the PUT of a copy that began
before, and the sender destroys the VDI it made (``engine.remote``).
"""

from __future__ import annotations

import threading
import time

TTL = 3600.0
MAX = 10000


class Grants:
    def __init__(self, ttl: float = TTL, limit: int = MAX) -> None:
        self.ttl = ttl
        self.limit = limit
        self._lock = threading.Lock()
        self._made: dict[tuple[str, str], tuple[str, float]] = {}

    def grant(self, sr: str, vdi: str, client: str) -> None:
        if not client or client.startswith("unix:"):
            return
        with self._lock:
            if len(self._made) >= self.limit:
                self._made.pop(next(iter(self._made)))  # the oldest
            self._made[(sr, vdi)] = (client, time.monotonic())

    def holder(self, sr: str, vdi: str) -> str | None:
        """The name that may upload into ``vdi`` of ``sr`` now, if any."""
        with self._lock:
            self._expire()
            got = self._made.get((sr, vdi))
        return got[0] if got else None

    def take(self, sr: str, vdi: str, client: str) -> bool:
        """Use ``client``'s grant for ``vdi`` (one upload per VDI.create)."""
        with self._lock:
            self._expire()
            got = self._made.get((sr, vdi))
            if got is None or got[0] != client:
                return False
            del self._made[(sr, vdi)]
            return True

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_c, t) in self._made.items() if now - t > self.ttl]:
            del self._made[k]
