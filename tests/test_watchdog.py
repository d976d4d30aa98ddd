"""The edge's stream deadlines: one thread for all of them, each firing once after its time unless disarmed."""

from __future__ import annotations

import threading
import time

from edge_client.remote.watchdog import Watchdog


def test_a_deadline_fires_once_after_its_time_and_a_disarmed_one_never() -> None:
    dog = Watchdog()
    fired: list[str] = []
    done = threading.Event()
    t0 = time.monotonic()
    late = dog.arm(0.15, lambda: (fired.append("late"), done.set()))
    kept = dog.arm(0.05, lambda: fired.append("early"))
    dropped = dog.arm(0.02, lambda: fired.append("dropped"))
    dog.disarm(dropped)
    assert done.wait(5)
    assert fired == ["early", "late"] and time.monotonic() - t0 >= 0.15
    dog.disarm(kept)  # already fired: nothing happens
    dog.disarm(late)


def test_many_reads_share_one_thread() -> None:
    dog = Watchdog()
    before = threading.active_count()
    handles = [dog.arm(30, lambda: None) for _ in range(200)]
    assert threading.active_count() == before + 1
    for h in handles:
        dog.disarm(h)
    fired = threading.Event()
    dog.arm(0.01, fired.set)  # the thread still serves new deadlines after a crowd of disarmed ones
    assert fired.wait(5)
