"""The network emulator adds the delay, jitter, bandwidth cap and drops it claims, and carries HTTP/1.1 and gRPC."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tandem_tools.netem import NetemConfig, NetemProxy, _Link, parse_hostport, start_in_thread

pytestmark = pytest.mark.timeout(30)

LOCAL = "127.0.0.1"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, LOCAL, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _proxy(upstream_port: int, **cfg: float | bool | None) -> NetemProxy:
    proxy = NetemProxy(LOCAL, 0, LOCAL, upstream_port, NetemConfig(seed=0, **cfg))  # type: ignore[arg-type]
    await proxy.start()
    return proxy


async def _round_trips(port: int, n: int) -> list[float]:
    """Milliseconds per 16-byte echo on one warm connection (the first exchange, with the handshake, is dropped)."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(n + 1):
        msg = f"{i:016d}".encode()
        t0 = time.perf_counter()
        writer.write(msg)
        assert await reader.readexactly(16) == msg
        times.append((time.perf_counter() - t0) * 1000)
    writer.close()
    return times[1:]


async def test_round_trip_matches_configured_rtt(echo_port: int) -> None:
    direct = statistics.median(await _round_trips(echo_port, 20))
    proxy = await _proxy(echo_port, rtt_ms=40)
    try:
        via = statistics.median(await _round_trips(proxy.port, 20))
    finally:
        await proxy.stop()
    print(f"\nmedian round trip: direct {direct:.2f} ms, through rtt=40 proxy {via:.2f} ms")
    assert direct < 5
    assert 38 <= via <= 60
    assert proxy.stats.connections == 1 and proxy.stats.bytes_up == proxy.stats.bytes_down == 21 * 16


async def test_new_connection_pays_the_handshake(echo_port: int) -> None:
    proxy = await _proxy(echo_port, rtt_ms=40)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        t0 = time.perf_counter()
        writer.write(b"x")
        await reader.readexactly(1)
        first = (time.perf_counter() - t0) * 1000
        writer.close()
    finally:
        await proxy.stop()
    print(f"\nfirst exchange on a new connection through rtt=40: {first:.2f} ms")
    assert 78 <= first <= 110


async def test_jitter_keeps_byte_order(echo_port: int) -> None:
    proxy = await _proxy(echo_port, rtt_ms=10, jitter_ms=10)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        sent = b"".join(f"<{i:05d}>".encode() for i in range(300))
        for i in range(0, len(sent), 7 * 5):  # five records per write, 1 ms apart: jitter alone would reorder them
            writer.write(sent[i : i + 35])
            await asyncio.sleep(0.001)
        got = await asyncio.wait_for(reader.readexactly(len(sent)), 10)
        writer.close()
    finally:
        await proxy.stop()
    assert got == sent


async def test_jitter_spreads_round_trips(echo_port: int) -> None:
    proxy = await _proxy(echo_port, rtt_ms=20, jitter_ms=8)
    try:
        times = await _round_trips(proxy.port, 20)
    finally:
        await proxy.stop()
    print(f"\nrtt=20 jitter=8: round trips {min(times):.1f}..{max(times):.1f} ms, sd {statistics.pstdev(times):.1f}")
    assert 2 <= min(times) < 20 < max(times) <= 60 and statistics.pstdev(times) > 2


def test_link_release_times_never_go_backwards() -> None:
    link, rng = _Link(), random.Random(0)
    cfg = NetemConfig(rtt_ms=20, jitter_ms=15)
    releases = [link.schedule(i * 0.001, 100, cfg, rng) for i in range(1000)]
    assert releases == sorted(releases)
    assert max(b - a for a, b in itertools.pairwise(releases)) > 0.005  # the jitter is really there


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads an 8-byte length, then that many bytes, then answers one byte."""
    n = int(await reader.readexactly(8))
    await reader.readexactly(n)
    writer.write(b"k")
    await writer.drain()
    writer.close()


async def _upload_seconds(port: int, n: int) -> float:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    t0 = time.perf_counter()
    writer.write(b"%08d" % n + b"\0" * n)
    await writer.drain()
    assert await reader.readexactly(1) == b"k"
    writer.close()
    return time.perf_counter() - t0


async def test_bandwidth_cap() -> None:
    server = await asyncio.start_server(_sink, LOCAL, 0)
    port = server.sockets[0].getsockname()[1]
    n, mbps = 250_000, 8.0
    proxy = await _proxy(port, bandwidth_mbps=mbps, handshake=False)
    try:
        free = await _upload_seconds(port, n)
        capped = await _upload_seconds(proxy.port, n)
    finally:
        await proxy.stop()
        server.close()
    expected = (n + 8) * 8 / (mbps * 1e6)
    print(f"\n{n} bytes: direct {free * 1000:.1f} ms, at {mbps:g} Mbps {capped * 1000:.1f} ms "
          f"(expected {expected * 1000:.0f} ms, {n * 8 / capped / 1e6:.2f} Mbps measured)")
    assert free < 0.1
    assert 0.95 * expected <= capped <= 1.4 * expected
    assert proxy.stats.bytes_up == n + 8


async def test_loss_resets_the_connection(echo_port: int) -> None:
    proxy = await _proxy(echo_port, loss_pct=100)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        writer.write(b"hello")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(5), 2)
        writer.close()
    finally:
        await proxy.stop()
    assert proxy.stats.drops == 1 and proxy.stats.active == 0


async def test_unreachable_upstream_resets_the_client() -> None:
    with socket.create_server((LOCAL, 0)) as probe:
        closed_port = probe.getsockname()[1]
    proxy = await _proxy(closed_port)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 2)
        writer.close()
    finally:
        await proxy.stop()


async def test_partial_loss_drops_some_connections(echo_port: int) -> None:
    proxy = await _proxy(echo_port, loss_pct=20)
    survived = 0
    try:
        for _ in range(20):
            try:
                await asyncio.wait_for(_round_trips(proxy.port, 3), 2)
                survived += 1
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
    finally:
        await proxy.stop()
    # 8 chunks per connection at 20%: about 17% survive
    assert 0 < survived < 20 and proxy.stats.drops == 20 - survived


async def test_blackhole_times_out_then_recovers(echo_port: int) -> None:
    proxy = await _proxy(echo_port)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        proxy.update(blackhole=True)
        writer.write(b"two")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(3), 0.3)
        proxy.update(blackhole=False)
        writer.write(b"six")  # "two" was swallowed, the connection lives on
        assert await asyncio.wait_for(reader.readexactly(3), 2) == b"six"
        writer.close()
    finally:
        await proxy.stop()


def test_blackhole_sync_client_times_out() -> None:
    with socket.create_server((LOCAL, 0)) as upstream:
        port = upstream.getsockname()[1]
        with start_in_thread(LOCAL, 0, LOCAL, port, NetemConfig(blackhole=True)) as proxy:
            client = socket.create_connection((LOCAL, proxy.port), timeout=0.3)
            client.sendall(b"ping")
            t0 = time.perf_counter()
            with pytest.raises(TimeoutError):
                client.recv(4)
            assert time.perf_counter() - t0 < 1
            client.close()
            assert proxy.stats.bytes_up == 0


async def test_rtt_changes_live(echo_port: int) -> None:
    proxy = await _proxy(echo_port, rtt_ms=10)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)

        async def rtt_ms() -> float:
            t0 = time.perf_counter()
            writer.write(b"x")
            await reader.readexactly(1)
            return (time.perf_counter() - t0) * 1000

        await rtt_ms()
        before = statistics.median([await rtt_ms() for _ in range(5)])
        proxy.update(rtt_ms=60)
        after = statistics.median([await rtt_ms() for _ in range(5)])
        writer.close()
    finally:
        await proxy.stop()
    print(f"\nsame connection: rtt=10 -> {before:.1f} ms, then rtt=60 -> {after:.1f} ms")
    assert 9 <= before <= 25 and 58 <= after <= 80


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: Nagle would hold the body ~40 ms

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = json.dumps({"echo": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def _post_ms(client: httpx.Client, payload: object) -> float:
    t0 = time.perf_counter()
    assert client.post("/", json=payload).json() == {"echo": payload}
    return (time.perf_counter() - t0) * 1000


def test_http11_through_proxy() -> None:
    server = ThreadingHTTPServer((LOCAL, 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with httpx.Client(base_url=f"http://{LOCAL}:{server.server_address[1]}", trust_env=False) as client:
            direct = statistics.median(_post_ms(client, [i]) for i in range(4))
        with start_in_thread(LOCAL, 0, LOCAL, server.server_address[1], NetemConfig(rtt_ms=20)) as proxy, \
                httpx.Client(base_url=f"http://{LOCAL}:{proxy.port}", trust_env=False, timeout=5) as client:
            _post_ms(client, {"a": 1})
            elapsed = statistics.median(_post_ms(client, [i, "x"]) for i in range(4))
            assert proxy.stats.connections == 1  # keep-alive through the proxy
    finally:
        server.shutdown()
        server.server_close()
    print(f"\nHTTP/1.1 request: direct {direct:.1f} ms, through rtt=20 {elapsed:.1f} ms")
    assert direct < 10 and 19 <= elapsed <= 40


def test_grpc_through_proxy() -> None:
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port(f"{LOCAL}:0")
    server.start()
    try:
        with start_in_thread(LOCAL, 0, LOCAL, port, NetemConfig(rtt_ms=20)) as proxy, \
                grpc.insecure_channel(f"{LOCAL}:{proxy.port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            t0 = time.perf_counter()
            stub.Check(request, timeout=5)
            elapsed = (time.perf_counter() - t0) * 1000
            assert proxy.stats.connections == 1 and proxy.stats.bytes_down > 0
    finally:
        server.stop(None)
    print(f"\ngRPC Check through rtt=20: {elapsed:.1f} ms")
    assert 19 <= elapsed <= 60


def test_netem_module_is_transport_free() -> None:
    code = "import sys, tandem_tools.netem\nassert not {'grpc', 'fastapi', 'uvicorn'} & set(sys.modules)\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    for bad in ("8000", "host:", ":80", "host:port"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_config_rejects_nonsense() -> None:
    for bad in ({"rtt_ms": -1}, {"bandwidth_mbps": 0}, {"loss_pct": 101}):
        with pytest.raises(ValueError):
            NetemConfig(**bad)  # type: ignore[arg-type]


def test_run_netem_serves_until_sigterm() -> None:
    with socket.create_server((LOCAL, 0)) as probe:
        free = probe.getsockname()[1]
    with socket.create_server((LOCAL, 0)) as upstream:
        code = (f"from tandem_tools.netem import run_netem\n"
                f"run_netem('{LOCAL}:{free}', '{LOCAL}:{upstream.getsockname()[1]}', 10, 0, None, 0)\n")
        with subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) as proc:
            try:
                line = proc.stderr.readline()  # type: ignore[union-attr]
                assert f"netem listening on {LOCAL}:{free}" in line and "rtt=10ms" in line
                socket.create_connection((LOCAL, free), timeout=2).close()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=5) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
