"""Deadlines on blocking reads of a stream: one thread for every pending deadline of the process, not a thread per
message. `arm(seconds, fire)` returns a handle; `disarm(handle)` before the deadline means `fire` never runs."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []  # (deadline, handle), the earliest first
        self._fires: dict[int, Callable[[], object]] = {}  # armed handles; a disarmed one is dropped here
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fire: Callable[[], object]) -> int:
        with self._cond:
            handle = next(self._ids)
            self._fires[handle] = fire
            heapq.heappush(self._heap, (time.monotonic() + seconds, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def disarm(self, handle: int) -> None:
        with self._cond:
            self._fires.pop(handle, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._fires:
                    heapq.heappop(self._heap)  # disarmed: forget its deadline
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, handle = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                fire = self._fires.pop(handle)
            fire()  # outside the lock: a cancel may take a while, and may arm or disarm others


WATCHDOG = Watchdog()
