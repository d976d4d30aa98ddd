"""Faults: a killed cloud, a dropped or blackholed link, a slow cloud, clients that leave mid-stream.

The promise: tandem keeps serving, loses no accepted token, and never hangs. Every wait here is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.client import edge_decoder
from edge_client.remote import GrpcVerifier, RemoteError
from edge_client.settings import EdgeSettings
from tandem.blocks import DraftBlock
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_protocol import pb as wire
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc
from tandem_tools.bench_load import parse_metrics
from tandem_tools.netem import NetemConfig, ThreadedProxy, start_in_thread
from tandem_tools.procs import CloudProcess
from tests.conftest import tiny_model, wrap

PROMPT = [10, 20, 30, 40, 50, 60, 70]
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)
STEP_S = 0.02  # the slow target's time per forward pass
pytestmark = pytest.mark.timeout(120)  # a hang fails here, well before the suite's own limit


def server_settings(**kw: object) -> ServerSettings:
    base: dict[str, object] = dict(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0,
                                   max_prompt_tokens=64, max_draft_tokens=16, max_tokens_limit=64,
                                   max_body_bytes=64 * 1024, shutdown_grace_s=0.5)
    return ServerSettings(**(base | kw))


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s} s")
        time.sleep(0.05)


def metric(h: ServerHandle, name: str) -> float:
    return parse_metrics(h.metrics.render().decode()).get(name, 0.0)


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    with BackgroundServer(server_settings(), tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module")
def expected(tiny_target: LoadedModel) -> list[int]:
    return generate_autoregressive(tiny_target, PROMPT, GREEDY).tokens


@pytest.fixture(scope="module")
def slow_server() -> Iterator[ServerHandle]:
    """The tiny target (same weights) taking STEP_S per forward pass: a generation lasts long enough to leave it."""
    target = wrap(tiny_model(0, layers=3), "tiny-target")
    target.model.register_forward_hook(lambda *_: time.sleep(STEP_S))
    with BackgroundServer(server_settings(), target) as handle:
        yield handle


def proxy_to(h: ServerHandle, transport: str, **cfg: object) -> ThreadedProxy:
    port = h.http_port if transport == "http" else h.grpc_port
    return start_in_thread("127.0.0.1", 0, "127.0.0.1", port, NetemConfig(**cfg))  # type: ignore[arg-type]


def edge_via(proxy: ThreadedProxy, transport: str, **kw: object) -> EdgeSettings:
    base: dict[str, object] = dict(cloud=f"127.0.0.1:{proxy.port}", transport=transport, gamma=3, timeout_s=2,
                                   retries=4, backoff_s=0.1, backoff_max_s=0.5)
    return EdgeSettings(**(base | kw))


# --- (a) the cloud killed (SIGKILL) and restarted on the same ports while several sessions run


@pytest.mark.slow
@pytest.mark.timeout(360)  # two cold starts of `tandem serve`
def test_sessions_survive_a_killed_and_restarted_cloud(tmp_path: object) -> None:
    from tandem.models import load_model

    draft = load_model("test-draft")
    prompts = [draft.tokenizer.encode(p, add_special_tokens=False) for p in
               ("import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self", "def parse_args(argv")]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    with CloudProcess(threads=1, env={"TANDEM_TARGET": "test-target"}) as cloud:
        settings = EdgeSettings(cloud=cloud.grpc_target, gamma=3, timeout_s=10, retries=10, backoff_s=0.2,
                                backoff_max_s=2.0)
        undisturbed = [edge_decoder(settings, draft).generate(p, params).tokens for p in prompts]
        reached = threading.Barrier(len(prompts) + 1, timeout=60)
        restarted = threading.Event()
        streamed: list[list[int]] = [[] for _ in prompts]
        results: list[object] = [None] * len(prompts)

        def run(i: int) -> None:
            def on_tokens(new: list[int]) -> None:
                streamed[i].extend(new)
                if len(streamed[i]) >= 6 and not restarted.is_set() and not reached.broken:
                    reached.wait()  # every session is mid-generation when the cloud dies
                    restarted.wait(60)

            try:
                results[i] = edge_decoder(settings, draft).generate(prompts[i], params, on_tokens=on_tokens)
            except Exception as e:
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        try:
            reached.wait()
            assert int(parse_metrics(cloud.metrics_text())["tandem_open_sessions"]) == len(prompts)
            cloud.kill()
            cloud.start()  # the same ports
            restarted.set()
        finally:
            restarted.set()
            for t in threads:
                t.join(120)
        for i, r in enumerate(results):
            assert not isinstance(r, Exception), r
            assert r.tokens == undisturbed[i] and streamed[i] == undisturbed[i]  # type: ignore[attr-defined]
            assert r.stats.resumes >= 1  # type: ignore[attr-defined]
        wait_for(lambda: parse_metrics(cloud.metrics_text())["tandem_open_sessions"] == 0, 10, "0 open sessions")


# --- (b) a link that drops connections or blackholes them mid-stream


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_dropped_connection_mid_stream_is_resumed(
    server: ServerHandle, tiny_draft: LoadedModel, expected: list[int], transport: str
) -> None:
    with proxy_to(server, transport) as proxy:
        def on_tokens(_: list[int]) -> None:
            if len(seen) == 0:
                proxy.update(loss_pct=100)  # the next chunk either way resets the connection
            seen.append(1)

        def heal() -> None:
            wait_for(lambda: proxy.stats.drops >= 1, 20, "a drop")
            proxy.update(loss_pct=0)

        seen: list[int] = []
        healer = threading.Thread(target=heal)
        healer.start()
        t0 = time.monotonic()
        result = edge_decoder(edge_via(proxy, transport), tiny_draft).generate(PROMPT, GREEDY, on_tokens=on_tokens)
        healer.join(30)
        assert proxy.stats.drops >= 1
    assert result.tokens == expected and result.stats.resumes >= 1
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_blackhole_mid_stream_times_out_then_resumes_or_fails_clearly(
    server: ServerHandle, tiny_draft: LoadedModel, expected: list[int], transport: str
) -> None:
    # a blackhole for a while: each call's deadline expires, the edge retries, and resumes once traffic flows
    with proxy_to(server, transport) as proxy:
        timer = threading.Timer(2.5, lambda: proxy.update(blackhole=False))

        def on_tokens(new: list[int]) -> None:
            if not timer.is_alive() and not timer.finished.is_set():
                proxy.update(blackhole=True)
                timer.start()

        settings = edge_via(proxy, transport, timeout_s=1.0, retries=6)
        result = edge_decoder(settings, tiny_draft).generate(PROMPT, GREEDY, on_tokens=on_tokens)
        timer.cancel()
    assert result.tokens == expected and result.stats.resumes >= 1

    # a blackhole for good: a clear error, bounded by the deadlines and the retries
    with proxy_to(server, transport) as proxy:
        def hole(_: list[int]) -> None:
            proxy.update(blackhole=True)

        settings = edge_via(proxy, transport, timeout_s=1.0, retries=2)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="unreachable after 3 attempts") as info:
            edge_decoder(settings, tiny_draft).generate(PROMPT, GREEDY, on_tokens=hole)
        elapsed = time.monotonic() - t0
    assert info.value.code == "deadline_exceeded" and "--fallback edge" in str(info.value)
    # three attempts, each at most a call's deadline plus the close's; the backoffs; slack for a busy machine
    assert elapsed < 3 * 2 * 1.0 + 0.3 + 6, elapsed


# --- (c) a slow cloud: deadlines expire, the edge retries, then says so (or falls back, marked lossy)


@pytest.mark.parametrize("transport", ["grpc", "grpc-unary", "http"])
def test_a_cloud_slower_than_the_deadline_is_a_clear_failure(
    server: ServerHandle, tiny_draft: LoadedModel, transport: str
) -> None:
    with proxy_to(server, "http" if transport == "http" else "grpc", rtt_ms=3000, handshake=False) as proxy:
        settings = edge_via(proxy, transport, timeout_s=0.8, retries=1)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="unreachable after 2 attempts") as info:
            edge_decoder(settings, tiny_draft).generate(PROMPT, GREEDY)
        assert info.value.code == "deadline_exceeded"
        assert time.monotonic() - t0 < 2 * 2 * 0.8 + 0.1 + 6  # never hangs: deadlines x attempts, and slack
        fallback = edge_decoder(settings.model_copy(update={"fallback": "edge"}), tiny_draft).generate(PROMPT, GREEDY)
    assert fallback.stats.lossy and len(fallback.tokens) == GREEDY.max_tokens


# --- (d) clients that leave mid-stream: their sessions and model work are freed, and the metrics count them


def test_leaving_the_sse_completion_stream_frees_the_generation(slow_server: ServerHandle) -> None:
    h = slow_server
    before = metric(h, "tandem_generation_tokens_total")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"http://127.0.0.1:{h.http_port}/v1/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the generation runs; then the client leaves
    wait_for(lambda: metric(h, 'tandem_client_disconnects_total{route="http sse"}') >= 1, 10, "a counted disconnect")
    wait_for(lambda: h.worker.inflight == 0, 5, "the admission slot freed")
    time.sleep(10 * STEP_S)
    generated = metric(h, "tandem_generation_tokens_total") - before
    assert generated < 30, generated  # the model stopped well short of 60 tokens


def test_leaving_the_grpc_generate_stream_frees_the_generation(slow_server: ServerHandle) -> None:
    h = slow_server
    before = metric(h, "tandem_generation_tokens_total")
    with grpc.insecure_channel(f"127.0.0.1:{h.grpc_port}") as channel:
        msg = pb.Open(prompt=PROMPT, sampling=wire.params_to_pb(SamplingParams(max_tokens=60, ignore_eos=True)))
        call = pb_grpc.VerifierStub(channel).Generate(msg, timeout=30)
        assert next(call).tokens
        call.cancel()
    wait_for(lambda: metric(h, 'tandem_client_disconnects_total{route="grpc Generate"}') >= 1, 10,
             "a counted disconnect")
    wait_for(lambda: h.worker.inflight == 0, 5, "the admission slot freed")
    time.sleep(10 * STEP_S)
    assert metric(h, "tandem_generation_tokens_total") - before < 30


def test_leaving_the_grpc_session_stream_closes_the_session(slow_server: ServerHandle,
                                                             tiny_draft: LoadedModel) -> None:
    h = slow_server
    verifier = GrpcVerifier(f"127.0.0.1:{h.grpc_port}", timeout_s=10, draft_fingerprint=tiny_draft.fingerprint)
    try:
        session = verifier.open(PROMPT, SamplingParams(max_tokens=60, ignore_eos=True))
        session.send(DraftBlock([1, 2]))
        session.recv()
        assert h.worker.open_sessions == 1
        session._call.cancel()  # the client goes away without a Close
    finally:
        verifier.close()
    wait_for(lambda: h.worker.open_sessions == 0, 10, "the session closed")
    assert metric(h, 'tandem_sessions_closed_total{reason="disconnected"}') >= 1
    assert metric(h, 'tandem_client_disconnects_total{route="grpc Session"}') >= 1
    assert metric(h, "tandem_open_sessions") == 0 and h.worker.inflight == 0


def test_leaving_the_edge_endpoints_stream_cancels_the_generation(slow_server: ServerHandle,
                                                                  tiny_draft: LoadedModel) -> None:
    h = slow_server
    settings = EdgeSettings(cloud=f"127.0.0.1:{h.grpc_port}", gamma=2, timeout_s=10, retries=0, port=0,
                            model_name="tiny-edge", max_tokens_limit=64, max_body_bytes=64 * 1024)
    before = metric(h, "tandem_generation_tokens_total")
    with BackgroundEdge(settings, tiny_draft) as port:
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny-edge", "prompt": PROMPT, "max_tokens": 60, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
            assert next(r.iter_lines()).startswith("data: ")
        wait_for(lambda: 'tandem_client_disconnects_total{route="http sse"} 1.0' in
                 httpx.get(url + "/metrics", timeout=5).text, 10, "a counted disconnect on the edge")
        wait_for(lambda: h.worker.open_sessions == 0, 10, "the cloud's session closed")
        assert metric(h, "tandem_generation_tokens_total") - before < 50  # stopped well short of 60
        # the draft thread is free again: the next request is served
        done = httpx.post(url + "/v1/completions", json=body | {"stream": False, "max_tokens": 4}, timeout=30)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
