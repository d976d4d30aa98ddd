"""Admission, shared by both servers (HTTP and gRPC): requests running at once, in all and per client (its API key, or
its address on an open server), a bounded queue served round-robin across clients, each request's wall-time limit,
and the wait worth retrying after a refusal (docs/reliability.md). Touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from tandem.errors import CapacityError, TandemError
from tandem_protocol.errors import ShuttingDownError, http_status
from tandem_protocol.metrics import Metrics

T = TypeVar("T")


class Overloaded(CapacityError):
    """429 / RESOURCE_EXHAUSTED: over a concurrency limit with no room to wait."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueTimeout(TandemError):
    """503 / UNAVAILABLE: waited its longest in the queue."""

    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(TandemError):
    """504 / DEADLINE_EXCEEDED: the request ran past the server's wall-time limit; its work was stopped."""

    code = "deadline_exceeded"


def retry_after(exc: BaseException) -> int | None:
    """Seconds worth waiting before retrying a refused request (429 and 503 always get some)."""
    given = getattr(exc, "retry_after_s", None)
    if given is not None:
        return int(given)
    code = getattr(exc, "code", "")
    return 1 if isinstance(exc, TandemError) and http_status(code) in (429, 503) else None


def client_key(authorization: str, address: str, keyed: bool) -> str:
    """Whose share a request counts against: its API key on a server with keys (checked already), else its address
    (an open server cannot trust a bearer token a client makes up)."""
    if keyed:
        return "key " + authorization.partition(" ")[2].strip()
    return "addr " + address


def grpc_peer_address(peer: str) -> str:
    """`ipv4:10.0.0.1:5000` -> `ipv4:10.0.0.1`, `ipv6:[::1]:5000` -> `ipv6:[::1]`."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # held from a thread with no event loop (a test): nothing to cancel
        return None


if sys.version_info >= (3, 11):

    async def within(aw: Awaitable[T], seconds: float) -> T:
        """`aw`, cancelled past `seconds` (raising TimeoutError)."""
        # not asyncio.wait_for: before Python 3.12 it returns the result and drops a cancel that lands in the loop
        # iteration where `aw` finishes, and a departed client's request then runs to its end
        async with asyncio.timeout(seconds):
            return await aw

else:

    async def within(aw: Awaitable[T], seconds: float) -> T:
        """`aw`, cancelled past `seconds` (raising TimeoutError)."""
        return await asyncio.wait_for(aw, seconds)  # 3.10 has no asyncio.timeout (its wait_for has the race)


class Ticket:
    """One admitted request. Its holders (the request, each of its generations) `share` it; it leaves the gate when
    the last one `release`s it."""

    def __init__(self, gate: Gate, key: str, task: asyncio.Task[object] | None) -> None:
        self.gate = gate
        self.key = key
        self.task = task
        self.admitted = time.monotonic()
        self.deadline = self.admitted + gate.max_request_s if gate.max_request_s > 0 else None
        self.users = 1
        self.expired = False

    def share(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.gate._leave(self)

    async def bounded(self, aw: Awaitable[T]) -> T:
        """`aw` within the request's wall time; past it, `aw` is cancelled and RequestTimeout raised."""
        if self.deadline is None:
            return await aw
        try:
            return await within(aw, max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if not self.expired:
                self.expired = True
                self.gate.metrics.cancelled.labels(reason="limit").inc()
            raise RequestTimeout(f"the request ran past this server's limit of {self.gate.max_request_s:g} s; "
                                 "its work was stopped") from None


@dataclass(eq=False)
class _Waiter:
    key: str
    task: asyncio.Task[object] | None
    since: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Ticket] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Gate:
    """`max_running` requests at once, at most `max_per_key` of them one client's (0: no own cap); up to `max_queue`
    more wait, each at most `max_wait_s` (0 queue: refused at once); each runs at most `max_request_s` (0: no limit)."""

    def __init__(self, metrics: Metrics, max_running: int, max_per_key: int = 0, max_queue: int = 0,
                 max_wait_s: float = 30.0, max_request_s: float = 0.0) -> None:
        self.metrics = metrics
        self.max_running = max_running
        self.max_per_key = max_per_key
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.max_request_s = max_request_s
        self.running = 0
        self.accepting = True
        self._per_key: collections.Counter[str] = collections.Counter()
        self._queues: dict[str, collections.deque[_Waiter]] = {}  # in round-robin order: a served key goes last
        self._tickets: set[Ticket] = set()
        self._service_s = 1.0  # a request's time in the gate, averaged: the Retry-After estimate

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _fits(self, key: str) -> bool:
        own = self.max_per_key <= 0 or self._per_key[key] < self.max_per_key
        return self.running < self.max_running and own

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._service_s * (self.waiting + 1) / self.max_running)))

    def _refuse(self, reason: str, message: str) -> Overloaded:
        self.metrics.rejected.labels(reason=reason).inc()
        return Overloaded(message, self._retry_after())

    def try_enter(self, key: str, new: bool = True) -> Ticket:
        """Admit at once or refuse (429). `new`: False for a call on work already admitted (a session's next
        block), which a draining server still takes."""
        ticket = self._try(key, new)
        if isinstance(ticket, Ticket):
            return ticket
        raise self._refuse(*ticket)

    def _try(self, key: str, new: bool) -> Ticket | tuple[str, str]:
        """A ticket, or why not: (reason, message)."""
        if new and not self.accepting:
            self.metrics.rejected.labels(reason="shutdown").inc()
            raise ShuttingDownError("the server is shutting down")
        if self._fits(key) and not self._queues.get(key):
            return self._admit(key, _current_task())
        if self.running >= self.max_running:
            return "capacity", f"over capacity: {self.running} requests running; retry later"
        return "client_limit", f"over this client's limit of {self.max_per_key} concurrent requests; retry later"

    async def enter(self, key: str, new: bool = True) -> Ticket:
        """Admit, waiting in the queue (fairly, at most `max_wait_s`) when over a limit and the queue has room."""
        ticket = self._try(key, new)
        if isinstance(ticket, Ticket):
            return ticket
        if self.max_queue <= 0:
            raise self._refuse(*ticket)
        mine = self._queues.get(key)
        if self.waiting >= self.max_queue:
            # full: the client with the most waiting gives up its newest, unless that is this client already
            top = max(self._queues, key=lambda k: len(self._queues[k]))
            if len(self._queues[top]) <= (len(mine) if mine else 0) + 1:
                raise self._refuse("queue_full", f"over capacity: {self.waiting} requests waiting; retry later")
            pushed = self._queues[top].pop()
            pushed.future.set_exception(self._refuse("queue_full", "over capacity: the queue is full; retry later"))
        waiter = _Waiter(key, _current_task())
        self._queues.setdefault(key, collections.deque()).append(waiter)
        self._gauges()
        timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                waiter.future.result().release()  # admitted just as its request went away
            raise
        finally:
            timer.cancel()
            self._unqueue(waiter)
            self.metrics.queue_wait.observe(time.monotonic() - waiter.since)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._unqueue(waiter)
            self.metrics.cancelled.labels(reason="limit").inc()
            waiter.future.set_exception(QueueTimeout(
                f"waited {self.max_wait_s:g} s in the queue without a turn; retry later", self._retry_after()))

    def _unqueue(self, waiter: _Waiter) -> None:
        q = self._queues.get(waiter.key)
        if q is not None and waiter in q:
            q.remove(waiter)
            if not q:
                del self._queues[waiter.key]
        self._gauges()

    def _admit(self, key: str, task: asyncio.Task[object] | None) -> Ticket:
        ticket = Ticket(self, key, task)
        self.running += 1
        self._per_key[key] += 1
        self._tickets.add(ticket)
        self._gauges()
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        if ticket not in self._tickets:
            return
        self._tickets.discard(ticket)
        self.running -= 1
        self._per_key[ticket.key] -= 1
        if self._per_key[ticket.key] <= 0:
            del self._per_key[ticket.key]
        self._service_s += 0.1 * (time.monotonic() - ticket.admitted - self._service_s)
        self._dispatch()
        self._gauges()

    def _dispatch(self) -> None:
        """Free slots go to waiting clients in turn, each client's requests in arrival order."""
        while self._queues and self.running < self.max_running:
            for key in list(self._queues):
                if self._fits(key):
                    q = self._queues.pop(key)
                    waiter = q.popleft()
                    if q:
                        self._queues[key] = q  # to the back of the round
                    waiter.future.set_result(self._admit(key, waiter.task))
                    break
            else:
                return  # every waiting client is at its own cap

    def _gauges(self) -> None:
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(self.waiting)

    @contextlib.asynccontextmanager
    async def admit(self, key: str, new: bool = True) -> AsyncIterator[Ticket]:
        ticket = await self.enter(key, new)
        try:
            yield ticket
        finally:
            ticket.release()

    @contextlib.contextmanager
    def hold(self, key: str = "") -> Iterator[Ticket]:
        """A slot held synchronously (refused at once when there is none)."""
        ticket = self.try_enter(key)
        try:
            yield ticket
        finally:
            ticket.release()

    # --- shutdown

    def close(self) -> None:
        """Refuse new requests (503); those waiting are refused too."""
        self.accepting = False
        for q in list(self._queues.values()):
            for waiter in list(q):
                self._unqueue(waiter)
                if not waiter.future.done():
                    self.metrics.rejected.labels(reason="shutdown").inc()
                    waiter.future.set_exception(ShuttingDownError("the server is shutting down"))

    async def drain(self, grace_s: float, idle: Callable[[], bool] | None = None) -> None:
        """Let what runs finish for up to `grace_s`, then cancel what is left."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not (self.running == 0 and (idle is None or idle())):
            await asyncio.sleep(0.05)
        for ticket in list(self._tickets):
            if ticket.task is not None and not ticket.task.done() and ticket.task is not asyncio.current_task():
                ticket.task.cancel()
                self.metrics.cancelled.labels(reason="shutdown").inc()
