"""Limits: per-client concurrency, a bounded fair queue with a longest wait, a wall-time limit per request, the
statuses and Retry-After each answers with, fairness between keys, and a bounded graceful shutdown."""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from edge_client.settings import EdgeSettings
from tandem.errors import CapacityError
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem_protocol import pb as wire
from tandem_protocol.errors import ShuttingDownError
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.limits import Gate, Overloaded, QueueTimeout
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc
from tests.conftest import tiny_model, wrap
from tests.test_faults import PROMPT, metric, server_settings, wait_for

pytestmark = pytest.mark.timeout(120)
STEP_S = 0.03


# --- the gate itself, no model


async def test_a_clients_cap_refuses_with_retry_after_while_others_run() -> None:
    gate = Gate(Metrics(), max_running=4, max_per_key=1)
    a = await gate.enter("a")
    with pytest.raises(Overloaded) as info:
        await gate.enter("a")
    assert info.value.code == "over_capacity" and info.value.retry_after_s >= 1
    b = await gate.enter("b")  # another client is not held back by a's flood
    assert gate.running == 2
    a.release()
    b.release()
    assert gate.running == 0


async def test_the_queue_serves_clients_in_turn_and_pushes_out_the_flooders_newest() -> None:
    m = Metrics()
    gate = Gate(m, max_running=1, max_queue=3, max_wait_s=5)
    first = await gate.enter("a")
    order: list[str] = []

    async def wait(key: str) -> None:
        ticket = await gate.enter(key)
        order.append(key)
        await asyncio.sleep(0)
        ticket.release()

    flood = [asyncio.create_task(wait("a")) for _ in range(3)]  # the queue is full of a's
    await asyncio.sleep(0.01)
    quiet = asyncio.create_task(wait("b"))  # pushes out a's newest, not refused
    await asyncio.sleep(0.01)
    assert flood[2].done() and isinstance(flood[2].exception(), Overloaded)
    assert gate.waiting == 3
    first.release()
    await asyncio.gather(*flood[:2], quiet)
    assert order == ["a", "b", "a"]  # in turn: b does not wait behind all of a's
    assert metric_value(m, 'tandem_requests_rejected_total{reason="queue_full"}') == 1


async def test_a_request_waits_at_most_the_longest_wait_then_503() -> None:
    m = Metrics()
    gate = Gate(m, max_running=1, max_queue=2, max_wait_s=0.2)
    held = await gate.enter("a")
    t0 = time.monotonic()
    with pytest.raises(QueueTimeout) as info:
        await gate.enter("b")
    assert 0.15 < time.monotonic() - t0 < 1.0
    assert info.value.code == "unavailable" and info.value.retry_after_s >= 1
    assert gate.waiting == 0 and metric_value(m, 'tandem_requests_cancelled_total{reason="limit"}') == 1
    held.release()


async def test_a_waiter_that_leaves_gives_up_its_place() -> None:
    gate = Gate(Metrics(), max_running=1, max_queue=4, max_wait_s=5)
    held = await gate.enter("a")
    gone = asyncio.create_task(gate.enter("b"))
    await asyncio.sleep(0.01)
    assert gate.waiting == 1
    gone.cancel()
    await asyncio.sleep(0.01)
    assert gate.waiting == 0
    held.release()
    assert gate.running == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 has no asyncio.timeout; its wait_for has the race")
async def test_a_cancel_landing_as_a_bounded_step_finishes_is_not_lost() -> None:
    # a departed client's cancel and its step's result in the same loop iteration: asyncio.wait_for (before 3.12)
    # returned the result and dropped the cancel, and the request ran on to its end with no one to answer
    gate = Gate(Metrics(), max_running=1, max_request_s=30)
    ticket = await gate.enter("a")
    step: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    request = asyncio.create_task(ticket.bounded(step))
    await asyncio.sleep(0)
    step.set_result(1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    ticket.release()


async def test_shutdown_refuses_new_and_waiting_and_cancels_what_outlives_the_grace() -> None:
    m = Metrics()
    gate = Gate(m, max_running=2, max_per_key=1, max_queue=4, max_wait_s=5)

    async def long_request() -> None:
        async with gate.admit("a"):
            await asyncio.sleep(30)

    running = asyncio.create_task(long_request())
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(gate.enter("a"))
    await asyncio.sleep(0.01)
    gate.close()
    await asyncio.sleep(0)
    assert isinstance(waiting.exception(), ShuttingDownError)
    with pytest.raises(ShuttingDownError):
        await gate.enter("c")
    (await gate.enter("b", new=False)).release()  # admitted work (a session's next block) still runs
    t0 = time.monotonic()
    await gate.drain(0.3)
    await asyncio.gather(running, return_exceptions=True)
    assert running.cancelled() and time.monotonic() - t0 < 1.0
    assert metric_value(m, 'tandem_requests_cancelled_total{reason="shutdown"}') >= 1


def metric_value(m: Metrics, name: str) -> float:
    from tandem_tools.bench_load import parse_metrics

    return parse_metrics(m.render().decode()).get(name, 0.0)


# --- the servers


def slow_target() -> LoadedModel:
    target = wrap(tiny_model(0, layers=3), "tiny-target")
    target.model.register_forward_hook(lambda *_: time.sleep(STEP_S))
    return target


@pytest.fixture(scope="module")
def keyed() -> Iterator[ServerHandle]:
    s = server_settings(api_keys=["ka", "kb"], max_requests_per_key=2, max_queue=16, max_queue_wait_s=20,
                        max_request_s=30, batch_window_ms=0)
    with BackgroundServer(s, slow_target()) as handle:
        yield handle


def post(h: ServerHandle, key: str, **kw: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0} | kw
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"http://127.0.0.1:{h.http_port}/v1/completions", json=body, timeout=60, headers=headers)


def ttft(h: ServerHandle, key: str) -> float:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{h.http_port}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if '"text"' in line:
                return time.perf_counter() - t0
    raise AssertionError("no token")


def test_one_keys_flood_does_not_starve_another_key(keyed: ServerHandle) -> None:
    h = keyed
    alone = statistics.median(ttft(h, "kb") for _ in range(5))
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            post(h, "ka", max_tokens=40, ignore_eos=True)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(6)]  # 2 run, the rest queue
    for t in threads:
        t.start()
    try:
        wait_for(lambda: h.worker.gate.waiting >= 2, 10, "a's flood queued")
        crowded = statistics.median(ttft(h, "kb") for _ in range(5))
        assert h.worker.gate.running <= 3  # a's two, and b's own
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"quiet key's TTFT: alone {alone * 1e3:.0f} ms, beside a flood {crowded * 1e3:.0f} ms")
    assert crowded <= 2 * alone, (alone, crowded)


def test_over_a_keys_cap_without_a_queue_is_429_with_retry_after(tiny_target: LoadedModel) -> None:
    s = server_settings(api_keys=["ka", "kb"], max_requests_per_key=1)
    with BackgroundServer(s, tiny_target) as h, h.worker.gate.hold("key ka"):
        r = post(h, "ka")
        assert r.status_code == 429 and r.json()["error"]["code"] == "over_capacity"
        assert int(r.headers["Retry-After"]) >= 1
        assert post(h, "kb").status_code == 200  # the other key is served
        with grpc.insecure_channel(f"127.0.0.1:{h.grpc_port}") as channel:
            msg = pb.Open(prompt=PROMPT, sampling=wire.params_to_pb(SamplingParams(max_tokens=4)))
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.VerifierStub(channel).OpenSession(msg, timeout=10, metadata=(("authorization", "Bearer ka"),))
            err = info.value
            assert isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int(dict(err.trailing_metadata() or ())["grpc-retry-pushback-ms"]) >= 1000
        assert metric(h, 'tandem_requests_rejected_total{reason="client_limit"}') == 2


def test_a_request_past_the_wall_time_limit_stops_and_answers_504() -> None:
    with BackgroundServer(server_settings(max_request_s=0.5), slow_target()) as h:
        t0 = time.monotonic()
        r = post(h, "", max_tokens=64, ignore_eos=True)  # 64 steps: well over 0.5 s
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - t0 < 2.0
        assert metric(h, 'tandem_requests_cancelled_total{reason="limit"}') == 1
        assert h.worker.inflight == 0
        time.sleep(3 * STEP_S)  # the pass under way may finish; nothing after it
        passes = metric(h, "tandem_target_forward_passes_total")
        time.sleep(0.3)
        assert metric(h, "tandem_target_forward_passes_total") == passes  # the work stopped


def test_shutdown_with_abandoned_and_running_requests_ends_within_the_grace(tiny_draft: LoadedModel) -> None:
    grace = 1.0
    server = BackgroundServer(server_settings(shutdown_grace_s=grace), slow_target())
    h = server.start()
    edge = BackgroundEdge(EdgeSettings(cloud=f"127.0.0.1:{h.grpc_port}", gamma=2, timeout_s=10, port=0,
                                       model_name="tiny-edge", max_tokens_limit=64, max_body_bytes=64 * 1024,
                                       shutdown_grace_s=grace, retries=5), tiny_draft)
    port = edge.__enter__()
    body = {"model": "tiny-edge", "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True}
    statuses: list[object] = []

    def hold() -> None:  # a client that stays: the stop cuts it off at the end of the grace
        try:
            statuses.append(httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30).status_code)
        except httpx.HTTPError as e:
            statuses.append(type(e).__name__)

    for timeout in (0.3, 0.3):  # abandoned ones, on the cloud and on the edge
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{h.http_port}/v1/completions", json=body | {"model": "tiny"},
                       timeout=timeout)
    staying = threading.Thread(target=hold)
    staying.start()
    wait_for(lambda: h.worker.open_sessions == 1, 10, "the edge's session open")
    t0 = time.monotonic()
    edge.stop()
    edge_s = time.monotonic() - t0
    assert not edge.thread.is_alive() and edge_s < grace + 1.5, edge_s
    staying.join(10)
    assert statuses == [503]  # cut off at the end of the grace, with an answer
    wait_for(lambda: h.worker.open_sessions == 0, 2, "the edge's cloud session closed")
    t0 = time.monotonic()
    server.stop(grace, timeout=10)
    cloud_s = time.monotonic() - t0
    assert cloud_s < grace + 1.5, cloud_s
    print(f"stopped within the {grace:g} s grace: edge {edge_s:.2f} s, cloud {cloud_s:.2f} s")


def test_new_requests_during_the_grace_get_503(tiny_target: LoadedModel) -> None:
    server = BackgroundServer(server_settings(shutdown_grace_s=2.0), tiny_target)
    h = server.start()
    h.worker.gate.close()  # what stop() does first
    r = post(h, "")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    server.stop(0.5)


def test_the_gate_is_the_workers_admission(tiny_target: LoadedModel) -> None:
    s = server_settings(max_concurrent_requests=1)
    with BackgroundServer(s, tiny_target) as h:
        with h.worker.admit(), pytest.raises(CapacityError):
            h.worker.gate.try_enter("x")
        assert h.worker.inflight == 0
