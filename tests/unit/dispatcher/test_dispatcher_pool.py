"""dispatcher.pool: slots shared fairly between SRs, one SR never takes them all."""

from __future__ import annotations

import threading
import time

from dispatcher.pool import Pool, default_share


def never() -> bool:
    return False


def test_default_share_leaves_a_quarter() -> None:
    assert default_share(16) == 12
    assert default_share(4) == 3
    assert default_share(2) == 1
    assert default_share(1) == 1
    assert Pool(16).share == 12
    assert Pool(4, share=10).share == 4


def test_one_sr_holds_at_most_its_share() -> None:
    pool = Pool(4)
    for _ in range(3):
        assert pool.acquire("a", 1, never) == "ok"
    # a's fourth call waits (and times out) although a slot is free ...
    t = time.monotonic()
    assert pool.acquire("a", 0.2, never) == "timeout"
    assert time.monotonic() - t >= 0.2
    # ... which b takes at once
    assert pool.acquire("b", 0.01, never) == "ok"
    st = pool.stats()
    assert st["busy"] == 4 and st["waiting"] == 0
    assert {q["key"]: q["running"] for q in st["queues"]} == {"a": 3, "b": 1}
    pool.release("b")
    for _ in range(3):
        pool.release("a")
    assert pool.stats() == {
        "workers": 4, "share": 3, "busy": 0, "waiting": 0, "queues": []
    }  # fmt: skip


def test_a_freed_slot_goes_to_the_sr_running_fewest() -> None:
    pool = Pool(2, share=2)
    assert pool.acquire("a", 1, never) == "ok"
    assert pool.acquire("a", 1, never) == "ok"
    order: list[str] = []

    def wait(key: str) -> None:
        assert pool.acquire(key, 10, never) == "ok"
        order.append(key)

    ta = threading.Thread(target=wait, args=("a",))
    ta.start()
    time.sleep(0.05)  # a's waiter is older ...
    tb = threading.Thread(target=wait, args=("b",))
    tb.start()
    deadline = time.monotonic() + 5
    while pool.waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.release("a")  # ... but b runs nothing: b gets the slot
    tb.join(5)
    assert order == ["b"]
    pool.release("a")
    ta.join(5)
    assert order == ["b", "a"]
    pool.release("a")
    pool.release("b")
    assert pool.busy == 0


def test_cancelled_waiter_leaves_the_queue() -> None:
    pool = Pool(1)
    assert pool.acquire("a", 1, never) == "ok"
    flag = threading.Event()
    result: list[str] = []
    t = threading.Thread(
        target=lambda: result.append(pool.acquire("b", 10, flag.is_set))
    )
    t.start()
    time.sleep(0.05)
    flag.set()
    pool.wake()
    t.join(5)
    assert result == ["cancelled"]
    assert pool.waiting == 0
    pool.release("a")
    assert pool.busy == 0
