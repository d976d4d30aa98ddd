"""A user-space network emulator: an asyncio TCP proxy that delays, throttles and drops traffic.

Each connection has two directions. In each, a reader stamps every chunk with a release time (the link's
serialization delay, bytes * 8 / bandwidth, then the one-way delay rtt/2 +- jitter) and a writer sends chunks when
they are due. Release times never go backwards, so jitter stretches the stream but never reorders its bytes. It is
plain TCP, so HTTP/1.1 and gRPC (HTTP/2) pass alike. The config can be swapped while the proxy runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)
_Chunks = asyncio.Queue[tuple[float, bytes]]  # (release time, chunk); an empty chunk is EOF

_READ_SIZE = 65536
_SEGMENT = 4096  # under a bandwidth cap, chunks are cut to this so the first bytes need not wait for the last
_QUEUE_CHUNKS = 256  # per direction; a full queue stops reading, which pushes back on the sender like a TCP window


@dataclass(frozen=True)
class NetemConfig:
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0  # each one-way delay is rtt/2 plus uniform noise in [-jitter, +jitter], floored at 0
    bandwidth_mbps: float | None = None  # per direction; None = unlimited
    # Chance, in percent, that a chunk kills its connection with a reset. TCP turns real packet loss into
    # retransmission delay; what a service sees of a bad network is a dropped connection.
    loss_pct: float = 0.0
    blackhole: bool = False  # swallow all traffic, keep connections open: clients must time out on their own
    handshake: bool = True  # a new connection pays the TCP handshake's round trip before its first bytes arrive
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"rtt_ms and jitter_ms must be >= 0, got {self.rtt_ms} and {self.jitter_ms}")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth_mbps must be > 0 or None, got {self.bandwidth_mbps}")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss_pct must be in [0, 100], got {self.loss_pct}")


@dataclass
class NetemStats:
    bytes_up: int = 0  # client -> upstream, delivered
    bytes_down: int = 0  # upstream -> client, delivered
    connections: int = 0  # accepted since start
    active: int = 0
    drops: int = 0  # connections reset by loss


class _Dropped(Exception):
    pass


@dataclass
class _Link:
    """One direction's clock: when the wire is free again and when the last chunk leaves the far end."""

    busy_until: float = 0.0
    last_release: float = 0.0

    def schedule(self, now: float, n_bytes: int, cfg: NetemConfig, rng: random.Random) -> float:
        start = max(now, self.busy_until)
        self.busy_until = start + (n_bytes * 8 / (cfg.bandwidth_mbps * 1e6) if cfg.bandwidth_mbps else 0.0)
        one_way_ms = max(0.0, cfg.rtt_ms / 2 + (rng.uniform(-cfg.jitter_ms, cfg.jitter_ms) if cfg.jitter_ms else 0.0))
        self.last_release = max(self.busy_until + one_way_ms / 1000, self.last_release)
        return self.last_release


def _segments(data: bytes, cfg: NetemConfig) -> list[bytes]:
    if cfg.bandwidth_mbps is None or len(data) <= _SEGMENT:
        return [data]
    return [data[i : i + _SEGMENT] for i in range(0, len(data), _SEGMENT)]


def _sockopt(writer: asyncio.StreamWriter, level: int, option: int, value: int | bytes) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: linger 0, then drop the buffer."""
    _sockopt(writer, socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def _first_error(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run all to completion; on the first exception cancel the rest and raise it (TaskGroup needs 3.11)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class NetemProxy:
    """Listens on (listen_host, listen_port) and forwards every connection to the upstream through the emulated link.
    `config` is read per chunk, so `update(rtt_ms=...)` takes effect on live connections; chunks already in flight
    keep the release time they were given."""

    def __init__(self, listen_host: str, listen_port: int, upstream_host: str, upstream_port: int,
                 config: NetemConfig) -> None:
        self.listen_host, self.listen_port = listen_host, listen_port
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.config = config
        self.stats = NetemStats()
        self.port = 0
        self._rng = random.Random(config.seed)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def update(self, **changes: Any) -> NetemConfig:
        # one attribute swap of a frozen object: safe to call from another thread
        self.config = replace(self.config, **changes)
        return self.config

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        try:
            await self._bridge(client_r, client_w)
        except asyncio.CancelledError:
            # stop() cancelled us: close with FIN, not RST, and end quietly (asyncio's stream callback would log
            # a cancelled handler as an error)
            client_w.close()
        finally:
            self.stats.active -= 1
            self._handlers.discard(task)

    async def _bridge(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        now = asyncio.get_running_loop().time()
        try:
            up_r, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError as e:
            log.warning("netem: upstream %s:%d unreachable: %s", self.upstream_host, self.upstream_port, e)
            _reset(client_w)
            return
        for w in (client_w, up_w):
            _sockopt(w, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Handshake: SYN, SYN-ACK, then the client's first bytes reach the server half a round trip later; the
        # server's first bytes (an HTTP/2 preface) leave only once it has accepted.
        rtt = self.config.rtt_ms / 1000 if self.config.handshake else 0.0
        up, down = _Link(last_release=now + 1.5 * rtt), _Link(last_release=now + 2 * rtt)
        try:
            await _first_error([*self._direction(client_r, up_w, up, "bytes_up"),
                                *self._direction(up_r, client_w, down, "bytes_down")])
        except (_Dropped, OSError):
            _reset(client_w)
            _reset(up_w)
        except asyncio.CancelledError:
            up_w.close()
            raise
        else:
            await _close(client_w)
            await _close(up_w)

    def _direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link,
                   counter: str) -> list[Coroutine[Any, Any, None]]:
        queue: _Chunks = asyncio.Queue(_QUEUE_CHUNKS)
        return [self._pump_in(reader, queue, link), self._pump_out(queue, writer, counter)]

    async def _pump_in(self, reader: asyncio.StreamReader, queue: _Chunks, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_READ_SIZE)
            now, cfg = loop.time(), self.config
            if not data:
                await queue.put((link.schedule(now, 0, cfg, self._rng), b""))  # EOF travels behind the last byte
                return
            if cfg.loss_pct and self._rng.random() * 100 < cfg.loss_pct:
                self.stats.drops += 1
                raise _Dropped
            for seg in _segments(data, cfg):
                await queue.put((link.schedule(now, len(seg), cfg, self._rng), seg))

    async def _pump_out(self, queue: _Chunks, writer: asyncio.StreamWriter, counter: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            release, data = await queue.get()
            delay = release - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:  # EOF: passed on, unless a blackhole swallows the FIN too (the far side keeps waiting)
                if not self.config.blackhole and writer.can_write_eof():
                    writer.write_eof()
                return
            if self.config.blackhole:
                continue
            writer.write(data)
            setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
            await writer.drain()


class ThreadedProxy:
    """A NetemProxy on its own event loop in a daemon thread, for sync clients."""

    def __init__(self, proxy: NetemProxy, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.proxy, self._loop, self._thread = proxy, loop, thread

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def stats(self) -> NetemStats:
        return self.proxy.stats

    def update(self, **changes: Any) -> NetemConfig:
        return self.proxy.update(**changes)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> ThreadedProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(listen_host: str, listen_port: int, upstream_host: str, upstream_port: int,
                    config: NetemConfig | None = None) -> ThreadedProxy:
    proxy = NetemProxy(listen_host, listen_port, upstream_host, upstream_port, config or NetemConfig())
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="netem", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        raise
    return ThreadedProxy(proxy, loop, thread)


def parse_hostport(s: str) -> tuple[str, int]:
    """"127.0.0.1:8000" or "[::1]:8000" -> (host, port)."""
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def run_netem(listen: str, upstream: str, rtt_ms: float, jitter_ms: float, bandwidth_mbps: float | None,
              loss_pct: float) -> None:
    """Run a proxy until SIGINT or SIGTERM."""
    config = NetemConfig(rtt_ms=rtt_ms, jitter_ms=jitter_ms, bandwidth_mbps=bandwidth_mbps, loss_pct=loss_pct)
    (lhost, lport), (uhost, uport) = parse_hostport(listen), parse_hostport(upstream)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(NetemProxy(lhost, lport, uhost, uport, config)))


async def _serve(proxy: NetemProxy) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await proxy.start()
    cfg = proxy.config
    log.info("netem listening on %s:%d -> %s:%d rtt=%gms jitter=%gms bandwidth=%s loss=%g%%", proxy.listen_host, port,
             proxy.upstream_host, proxy.upstream_port, cfg.rtt_ms, cfg.jitter_ms,
             f"{cfg.bandwidth_mbps:g}Mbps" if cfg.bandwidth_mbps else "unlimited", cfg.loss_pct)
    try:
        await stop.wait()
    finally:
        await proxy.stop()
