"""A VM disk backend for tests, modelled on tapdisk: it holds its chain open
and writes while the SR changes around it.

Run as a process: ``python tapwriter.py LEAF SM_ROOT SR VDI REGION SEED``.
Like tapdisk it opens the chain once (``smcommon.vhd.Image.open``: the leaf
read-write with its exclusive image lock, every parent read-only with a
shared lock), never re-reads a header or a parent locator, and keeps the
images open until told to pause.  It writes 4 KiB pieces at random places of
the first REGION bytes, each durable before the next, and after every write
reads back a random piece it wrote earlier (and, now and then, a whole 2 MiB
block) and compares it with its model of the disk: any difference is a wrong
byte read through the chain.

Commands on stdin, one per line, each answered by one JSON line on stdout:

  pause PATH   stop writing, close the chain (as tapdisk does for a snapshot),
               write the model (offset -> version) to PATH as JSON
  resume       open the chain again from LEAF, under the VDI lock (the SM
               re-opens a backend only under it), and go on writing
  stop         close, answer the counts: writes, reads, wrong (a list)

The content of a piece is a function of (offset, version): ``piece()``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import threading
from pathlib import Path

PIECE = 4096
BLOCK = 2 * 1024 * 1024


def piece(offset: int, version: int) -> bytes:
    """The 4 KiB a piece holds at ``version`` (0: never written, zeros)."""
    if version == 0:
        return bytes(PIECE)
    digest = hashlib.blake2b(f"{offset}:{version}".encode(), digest_size=64).digest()
    return digest * (PIECE // len(digest))


class Writer:
    def __init__(self, leaf: str, root: str, sr: str, vdi: str, region: int, seed: int):
        self.leaf, self.root, self.sr, self.vdi = leaf, root, sr, vdi
        self.slots = region // PIECE
        self.rng = random.Random(seed)
        self.model: dict[int, int] = {}
        self.version = 0
        self.writes = 0
        self.reads = 0
        self.wrong: list[str] = []
        self.errors: list[str] = []
        self.img = None
        self.running = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.quit = False
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def open(self) -> None:
        from smcommon import lock
        from smcommon.paths import Paths
        from smcommon.vhd.image import Image

        with lock.vdi_lock(Paths(self.root), self.sr, self.vdi, timeout=60):
            self.img = Image.open(self.leaf, writable=True)

    def close(self) -> None:
        if self.img is not None:
            self.img.close()
            self.img = None

    def loop(self) -> None:
        while not self.quit:
            if not self.running.wait(0.05):
                continue
            self.idle.clear()
            try:
                if self.running.is_set():
                    self.step()
            except Exception as e:  # noqa: BLE001 - reported by "stop"
                self.errors.append(f"{type(e).__name__}: {e}")
                self.running.clear()
            finally:
                self.idle.set()

    def step(self) -> None:
        img = self.img
        assert img is not None
        slot = self.rng.randrange(self.slots)
        off = slot * PIECE
        self.version += 1
        img.write(off, piece(off, self.version))
        self.model[off] = self.version
        self.writes += 1
        back = self.rng.choice(list(self.model)) if self.model else off
        self.check(back, img.read(back, PIECE))
        if self.writes % 50 == 0:  # a whole block, through every layer of the chain
            start = self.rng.randrange(self.slots * PIECE // BLOCK or 1) * BLOCK
            n = min(BLOCK, self.slots * PIECE - start)
            data = img.read(start, n)
            for at in range(0, n, PIECE):
                self.check(start + at, data[at : at + PIECE])

    def check(self, off: int, got: bytes) -> None:
        self.reads += 1
        want = piece(off, self.model.get(off, 0))
        if got != want:
            self.wrong.append(f"offset {off} version {self.model.get(off, 0)}")

    def pause(self) -> None:
        self.running.clear()
        self.idle.wait()
        self.close()


def main() -> int:
    leaf, root, sr, vdi, region, seed = sys.argv[1:7]
    w = Writer(leaf, root, sr, vdi, int(region), int(seed))
    w.open()
    w.thread.start()
    w.running.set()

    def answer(doc: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "pause":
            w.pause()
            Path(arg).write_text(json.dumps({str(k): v for k, v in w.model.items()}))
            answer({"paused": True, "writes": w.writes, "errors": w.errors})
        elif cmd == "resume":
            try:
                w.open()
            except Exception as e:  # noqa: BLE001 - the test reports it
                answer({"resumed": False, "error": f"{type(e).__name__}: {e}"})
                continue
            w.running.set()
            answer({"resumed": True})
        elif cmd == "stop":
            w.pause()
            w.quit = True
            w.thread.join(5)
            answer(
                {
                    "writes": w.writes,
                    "reads": w.reads,
                    "wrong": w.wrong[:20],
                    "nwrong": len(w.wrong),
                    "errors": w.errors,
                    "model": {str(k): v for k, v in w.model.items()},
                }
            )
            return 0
        else:
            answer({"error": f"unknown command {cmd!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
