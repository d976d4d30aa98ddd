"""Work stops when its client leaves: non-streaming HTTP requests (cloud and edge), gRPC calls cancelled or past
their deadline. The target's pass counter is the witness: it stops within 2 s of the clients leaving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_protocol import pb as wire
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc
from tests.conftest import tiny_model, wrap
from tests.test_faults import PROMPT, metric, server_settings, wait_for

pytestmark = pytest.mark.timeout(120)
DELAY = [0.03]  # the slow target's time per forward pass (a test may slow it further)
PASSES = "tandem_target_forward_passes_total"


@pytest.fixture(scope="module")
def slow() -> Iterator[ServerHandle]:
    target = wrap(tiny_model(0, layers=3), "tiny-target")
    target.model.register_forward_hook(lambda *_: time.sleep(DELAY[0]))
    with BackgroundServer(server_settings(max_tokens_limit=128), target) as handle:
        yield handle


def passes_stop(h: ServerHandle, within_s: float = 2.0) -> float:
    """Seconds until the target's pass counter holds still (no pass in 0.3 s); fails past `within_s`."""
    t0 = time.monotonic()
    last, since = metric(h, PASSES), time.monotonic()
    while time.monotonic() - since < 0.3:
        assert time.monotonic() - t0 < within_s + 0.3, "the target kept working for departed clients"
        time.sleep(0.02)
        now = metric(h, PASSES)
        if now != last:
            last, since = now, time.monotonic()
    return since - t0


def leave_after(url: str, body: dict[str, object], seconds: float) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=seconds)


LONG = {"max_tokens": 120, "ignore_eos": True}  # 120 passes: ~4 s on the slow target


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_requests_stop_when_their_clients_leave(slow: ServerHandle, route: str) -> None:
    h = slow
    before = metric(h, 'tandem_requests_cancelled_total{reason="client_gone"}')
    body: dict[str, object] = {"model": "tiny", **LONG}
    body |= {"prompt": PROMPT} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{h.http_port}{route}"
    clients = [threading.Thread(target=leave_after, args=(url, body, 1.0)) for _ in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(10)
    stopped = passes_stop(h)
    print(f"{route}: the target's passes stopped {stopped:.2f} s after the clients left")
    assert h.worker.inflight == 0 and metric(h, "tandem_requests_running") == 0
    assert metric(h, 'tandem_requests_cancelled_total{reason="client_gone"}') - before == 3
    assert metric(h, f'tandem_requests_total{{route="POST {route}",status="499"}}') >= 3


def test_a_request_after_a_flood_of_departed_clients_is_served_promptly_and_exactly(slow: ServerHandle,
                                                                                      tiny_target: LoadedModel) -> None:
    h = slow
    url = f"http://127.0.0.1:{h.http_port}/v1/completions"
    flood = [threading.Thread(target=leave_after, args=(url, {"model": "tiny", "prompt": PROMPT, **LONG}, 1.0))
             for _ in range(6)]
    for c in flood:
        c.start()
    for c in flood:
        c.join(10)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    t0 = time.perf_counter()
    with httpx.stream("POST", url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True,
                                         "temperature": 0, "stream": True, "return_token_ids": True}, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        ttft = time.perf_counter() - t0
    assert ttft < 1.0, ttft  # not behind the departed clients' work
    import json

    ids = [t for line in lines for c in json.loads(line[6:])["choices"] for t in c.get("token_ids") or []]
    assert ids == generate_autoregressive(tiny_target, PROMPT, params).tokens  # a client that stays: exact


def test_the_edges_non_streaming_request_stops_drafting_and_frees_the_cloud(slow: ServerHandle,
                                                                            tiny_draft: LoadedModel) -> None:
    h = slow
    settings = EdgeSettings(cloud=f"127.0.0.1:{h.grpc_port}", gamma=2, timeout_s=10, retries=2, port=0,
                            model_name="tiny-edge", max_tokens_limit=128, max_body_bytes=64 * 1024)
    with BackgroundEdge(settings, tiny_draft) as port:
        url = f"http://127.0.0.1:{port}/v1/completions"
        leave_after(url, {"model": "tiny-edge", "prompt": PROMPT, **LONG}, 1.0)
        stopped = passes_stop(h)
        wait_for(lambda: h.worker.open_sessions == 0, 1, "the cloud's session closed at once, not at its TTL")
        edge_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'tandem_requests_cancelled_total{reason="client_gone"} 1.0' in edge_metrics
        assert "tandem_requests_running 0.0" in edge_metrics
        print(f"edge: the target's passes stopped {stopped:.2f} s after the client left")
        done = httpx.post(url, json={"model": "tiny-edge", "prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4


def test_grpc_deadlines_stop_the_work_unary_and_streaming(slow: ServerHandle) -> None:
    h = slow
    before = metric(h, 'tandem_requests_cancelled_total{reason="deadline"}')
    with grpc.insecure_channel(f"127.0.0.1:{h.grpc_port}") as channel:
        stub = pb_grpc.VerifierStub(channel)
        msg = pb.Open(prompt=PROMPT, sampling=wire.params_to_pb(SamplingParams(max_tokens=120, ignore_eos=True)))
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Generate(msg, timeout=1.0):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        passes_stop(h)
        DELAY[0] = 0.5  # a prefill slower than the deadline
        try:
            with pytest.raises(grpc.RpcError) as info:
                stub.OpenSession(msg, timeout=0.2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            time.sleep(0.6)
        finally:
            DELAY[0] = 0.03
    wait_for(lambda: metric(h, 'tandem_requests_cancelled_total{reason="deadline"}') - before == 2, 2,
             "both deadlines counted")
    assert h.worker.open_sessions == 0 and h.worker.inflight == 0


def test_a_verify_cancelled_mid_pass_ends_its_session(slow: ServerHandle) -> None:
    h = slow
    with grpc.insecure_channel(f"127.0.0.1:{h.grpc_port}") as channel:
        stub = pb_grpc.VerifierStub(channel)
        msg = pb.Open(prompt=PROMPT, sampling=wire.params_to_pb(SamplingParams(max_tokens=20, ignore_eos=True)))
        opened = stub.OpenSession(msg, timeout=10)
        DELAY[0] = 0.5
        try:
            request = pb.VerifyRequest(session_id=opened.session_id, draft=pb.Draft(seq=0, tokens=[1, 2]))
            with pytest.raises(grpc.RpcError):
                stub.Verify(request, timeout=0.2)
            time.sleep(0.6)
        finally:
            DELAY[0] = 0.03
        # the pass may have moved the session on without a verdict: it is gone, the edge resumes from its context
        with pytest.raises(grpc.RpcError) as info:
            stub.Verify(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert metric(h, 'tandem_sessions_closed_total{reason="cancelled"}') >= 1
