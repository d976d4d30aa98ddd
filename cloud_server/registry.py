"""The cloud's sessions: which sessions exist, what they reserve, when they expire.

Touched only from the event loop. A session's model state (`TargetSession`) lives on the model thread; the registry
only hands it over (`close` is queued behind whatever that thread is doing with it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.blocks import VerifyResult
from tandem.errors import CapacityError, SessionConflictError, SessionNotFoundError
from tandem.session import TargetSession
from tandem_protocol.metrics import Metrics

log = logging.getLogger(__name__)
_ENDED_BY_CLIENT = ("closed", "continued", "disconnected")
_ENDED_KEPT = 4096  # ids of ended sessions remembered (a few hundred KiB at most)


@dataclass
class Session:
    id: str
    reserved_bytes: int
    client_id: str
    last_used: float
    core: TargetSession | None = None  # None while prefilling
    next_seq: int = 0
    last: VerifyResult | None = None
    busy: bool = True
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)  # notified when next_seq moves or on close
    closed: bool = False


async def _wake(entry: Session) -> None:
    async with entry.turn:
        entry.turn.notify_all()


class SessionRegistry:
    def __init__(self, metrics: Metrics, max_sessions: int, max_memory_bytes: int, ttl_s: float,
                 release: Callable[[TargetSession], None]) -> None:
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.max_memory_bytes = max_memory_bytes
        self.ttl_s = ttl_s
        self._release = release  # hands a session's model state back to the model thread to free
        self._sessions: dict[str, Session] = {}
        # sessions their client ended (closed, or went on as a stream), newest last: a later call on one is a
        # conflict (409) and a second close does nothing; an expired one is simply unknown (404: the edge resumes)
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.accepting = True
        self._sweeper: asyncio.Task[None] | None = None
        self._wakers: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    def shutdown(self) -> None:
        self.accepting = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        for entry in list(self._sessions.values()):
            self.drop(entry, "shutdown")

    def add(self, sid: str, reserve: int, client_id: str) -> Session:
        """Register a session before its prefill, so that concurrent opens count it; a resume replaces its id."""
        self.evict_expired()
        if sid in self._sessions:
            self.drop(self._sessions[sid], "replaced")
        if len(self._sessions) >= self.max_sessions:
            raise CapacityError(f"over capacity: {len(self._sessions)} sessions open; retry later")
        used = sum(e.reserved_bytes for e in self._sessions.values())
        if used + reserve > self.max_memory_bytes:
            raise CapacityError(
                f"over capacity: sessions hold {used / 2**20:.1f} MiB of {self.max_memory_bytes / 2**20:.1f} MiB KV "
                f"memory; this one needs {reserve / 2**20:.1f} MiB"
            )
        entry = Session(sid, reserve, client_id, time.monotonic())
        self._sessions[sid] = entry
        self._ended.pop(sid, None)
        self.metrics.open_sessions.set(len(self._sessions))
        return entry

    def get(self, session_id: str) -> Session:
        self.evict_expired()
        entry = self._sessions.get(session_id)
        if entry is None:
            if session_id in self._ended:
                raise SessionConflictError(f"session {session_id!r} has ended ({self._ended[session_id]})")
            raise SessionNotFoundError(f"unknown or expired session {session_id!r}")
        return entry

    def close(self, session_id: str, reason: str = "closed") -> bool:
        """False for a session its client ended already (closing twice does nothing)."""
        entry = self._sessions.get(session_id)
        if entry is None:
            if session_id in self._ended:
                return False
            raise SessionNotFoundError(f"unknown or expired session {session_id!r}")
        self.drop(entry, reason)
        return True

    def take(self, session_id: str) -> TargetSession:
        """Hand an idle session's model state over to a stream of the target alone (which then frees it)."""
        entry = self.get(session_id)
        if entry.busy or entry.core is None:
            raise SessionConflictError(f"session {session_id!r} is busy with another request")
        core, entry.core = entry.core, None
        self.drop(entry, "continued")
        return core

    def forget(self, entry: Session) -> None:
        if self._sessions.get(entry.id) is entry:
            del self._sessions[entry.id]
        self.metrics.open_sessions.set(len(self._sessions))

    def drop(self, entry: Session, reason: str = "closed") -> None:
        if reason in _ENDED_BY_CLIENT and self._sessions.get(entry.id) is entry:
            self._ended[entry.id] = reason
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
        self.forget(entry)
        entry.closed = True  # a Draft sent ahead and waiting for its turn is answered at once (404, or 409 if ended)
        with contextlib.suppress(RuntimeError):  # no running event loop: nobody can be waiting
            task = asyncio.get_running_loop().create_task(_wake(entry))
            self._wakers.add(task)
            task.add_done_callback(self._wakers.discard)
        self.metrics.sessions_closed.labels(reason=reason).inc()
        if entry.core is not None:
            self._release(entry.core)

    def evict_expired(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        for entry in list(self._sessions.values()):
            if not entry.busy and entry.last_used < deadline:
                log.info("session %s expired", entry.id)
                self.drop(entry, "expired")

    async def _sweep_forever(self) -> None:
        period = min(self.ttl_s / 2, 5.0)
        while True:
            await asyncio.sleep(period)
            self.evict_expired()
