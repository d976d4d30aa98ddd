"""The edge client end to end against a real cloud server on loopback, with tiny random-weight models."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.client import edge_decoder
from edge_client.remote import RemoteError
from edge_client.settings import EdgeSettings
from tandem.costs import Ewma
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_tools.netem import NetemConfig, start_in_thread

PROMPT = [10, 20, 30, 40, 50, 60, 70]
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


def server_settings(**kw: object) -> ServerSettings:
    base: dict[str, object] = dict(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0,
                                   max_prompt_tokens=64, max_draft_tokens=16, max_tokens_limit=64,
                                   max_body_bytes=64 * 1024, shutdown_grace_s=0.5)
    return ServerSettings(**(base | kw))


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    with BackgroundServer(server_settings(), tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module")
def expected(tiny_target: LoadedModel) -> list[int]:
    return generate_autoregressive(tiny_target, PROMPT, GREEDY).tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(h: ServerHandle, transport: str) -> str:
    return f"127.0.0.1:{h.http_port if transport == 'http' else h.grpc_port}"


def edge(h: ServerHandle, transport: str = "grpc", **kw: object) -> EdgeSettings:
    base: dict[str, object] = dict(cloud=address(h, transport), transport=transport, timeout_s=10, retries=0)
    return EdgeSettings(**(base | kw))


# --- greedy output is the target's, whatever the transport, the rounds and gamma


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("gamma", [2, 5, "adaptive"])
def test_greedy_output_equals_the_target_alone(
    server: ServerHandle, tiny_draft: LoadedModel, expected: list[int], transport: str, pipeline: bool,
    gamma: int | str,
) -> None:
    result = edge_decoder(edge(server, transport, pipeline=pipeline, gamma=gamma), tiny_draft).generate(PROMPT, GREEDY)
    assert result.tokens == expected
    s = result.stats.as_dict()
    assert s["rounds"] == s["target_passes"] > 0 and 0 < s["accepted"] <= s["drafted"]
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0 and s["rtt_ms_mean"] is not None
    assert s["tokens"] == len(expected) and not s["lossy"]
    if gamma == "adaptive":
        assert s["gamma_mean"] > 0 and 0 <= s["gamma_last"] <= 12  # the last block may be cut by max_tokens
    if pipeline:  # blocks were sent ahead: some came back stale, or the rounds beat one per verdict
        assert s["stale"] > 0 or s["rounds"] < len(expected)


def test_unary_grpc_pipelined_and_sampled_runs(server: ServerHandle, tiny_draft: LoadedModel,
                                                expected: list[int]) -> None:
    assert edge_decoder(edge(server, "grpc-unary", gamma=3), tiny_draft).generate(PROMPT, GREEDY).tokens == expected
    sampled = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)
    result = edge_decoder(edge(server, "grpc", gamma=3), tiny_draft).generate(PROMPT, sampled)
    assert len(result.tokens) == 24 and result.stats.rounds > 0


def test_cloud_and_edge_modes(server: ServerHandle, tiny_draft: LoadedModel, expected: list[int]) -> None:
    for transport in ("grpc", "http"):
        cloud = edge_decoder(edge(server, transport, mode="cloud"), tiny_draft).generate(PROMPT, GREEDY)
        assert cloud.tokens == expected and cloud.stats.target_passes == len(expected)
        assert cloud.stats.bytes_received > 0
    alone = edge_decoder(edge(server, mode="edge"), tiny_draft).generate(PROMPT, GREEDY)
    assert alone.tokens == generate_autoregressive(tiny_draft, PROMPT, GREEDY).tokens
    assert alone.stats.lossy and alone.stats.edge_tokens == len(alone.tokens)


# --- faults


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_cloud_restart_mid_generation_loses_and_duplicates_nothing(
    tiny_target: LoadedModel, tiny_draft: LoadedModel, expected: list[int], transport: str
) -> None:
    first = BackgroundServer(server_settings(), tiny_target)
    h1 = first.start()
    ports = dict(http_port=h1.http_port, grpc_port=h1.grpc_port)
    second: list[BackgroundServer] = []
    seen: list[int] = []

    def restart() -> None:
        first.stop(grace=0.1)
        time.sleep(0.3)  # the edge's next call fails, then it backs off and retries
        second.append(BackgroundServer(server_settings(**ports), tiny_target))
        second[0].start()

    def on_tokens(tokens: list[int]) -> None:
        seen.extend(tokens)
        if len(seen) >= 8 and not second and not restarter.is_alive():
            restarter.start()
            restarter.join()  # the cloud is gone before the next round

    restarter = threading.Thread(target=restart)
    settings = edge(h1, transport, gamma=3, retries=6, backoff_s=0.1)
    try:
        result = edge_decoder(settings, tiny_draft).generate(PROMPT, GREEDY, on_tokens=on_tokens)
    finally:
        for s in second:
            s.stop(grace=0.1)
    assert result.tokens == expected and seen == expected
    assert result.stats.resumes >= 1


def test_unreachable_cloud_is_a_clear_error_or_the_lossy_fallback(tiny_draft: LoadedModel) -> None:
    settings = EdgeSettings(cloud=f"127.0.0.1:{free_port()}", timeout_s=2, retries=1, backoff_s=0.05)
    with pytest.raises(RemoteError, match="unreachable") as info:
        edge_decoder(settings, tiny_draft).generate(PROMPT, GREEDY)
    assert "--fallback edge" in str(info.value)
    fallback = settings.model_copy(update={"fallback": "edge"})
    result = edge_decoder(fallback, tiny_draft).generate(PROMPT, GREEDY)
    assert result.tokens == generate_autoregressive(tiny_draft, PROMPT, GREEDY).tokens
    assert result.stats.lossy and result.stats.edge_tokens == len(result.tokens)


@pytest.mark.parametrize("transport", ["grpc", "grpc-unary", "http"])
def test_auto_mode_continues_as_a_cloud_stream_when_the_round_trip_is_huge(
    tiny_target: LoadedModel, tiny_draft: LoadedModel, expected: list[int], transport: str
) -> None:
    """The cloud, told the edge's round trip, advises 0: the session goes on as a cloud stream from its cache."""
    with BackgroundServer(server_settings(), tiny_target) as server:  # its own: nothing learnt from other tests
        _continues_as_a_stream(server, tiny_draft, expected, transport)


def _continues_as_a_stream(server: ServerHandle, tiny_draft: LoadedModel, expected: list[int], transport: str) -> None:
    port = server.http_port if transport == "http" else server.grpc_port
    before = _metric(server, "tandem_sessions_continued_total")
    with start_in_thread("127.0.0.1", 0, "127.0.0.1", port, NetemConfig(rtt_ms=250)) as proxy:
        settings = EdgeSettings(cloud=f"127.0.0.1:{proxy.port}", transport=transport, mode="auto", timeout_s=10,
                                retries=0)
        client = edge_decoder(settings, tiny_draft)
        client.gamma_policy.draft_s = Ewma(1e-6)  # drafting free (then measured): first blocks advised
        result = client.generate(PROMPT, GREEDY)
        # the edge now knows its round trip and says so at open: the cloud advises 0 before any block
        again = client.generate(PROMPT, GREEDY)
    assert result.tokens == expected  # nothing lost or repeated at the switch
    stats = result.stats
    assert stats.switched_to_cloud and stats.advice and stats.advice[-1] == 0
    assert stats.switched_at is not None and 0 < stats.switched_at < len(expected)
    assert stats.estimate["rtt_ms"] > 150
    assert stats.resumes == 0  # no second prefill: the session itself went on
    assert again.tokens == expected
    assert again.stats.advice == [0] and again.stats.switched_at == 0 and again.stats.rounds == 0
    assert _metric(server, "tandem_sessions_continued_total") == before + 2


def _metric(server: ServerHandle, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# --- the edge's own OpenAI-compatible endpoint


@pytest.fixture(scope="module")
def endpoint(server: ServerHandle, tiny_draft: LoadedModel) -> Iterator[str]:
    settings = edge(server, "grpc", port=0, model_name="tiny-edge", max_tokens_limit=64, max_body_bytes=64 * 1024)
    with BackgroundEdge(settings, tiny_draft) as port:
        yield f"http://127.0.0.1:{port}"


def test_openai_client_against_the_edge_endpoint(endpoint: str, tiny_target: LoadedModel) -> None:
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="none", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-edge"]
    prompt = "def add(a, b):"
    ids = tiny_target.tokenizer.encode(prompt, add_special_tokens=False)
    reference = generate_autoregressive(tiny_target, ids, SamplingParams(max_tokens=12)).tokens
    expected = tiny_target.tokenizer.decode(reference, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    done = client.completions.create(model="tiny-edge", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)
    assert done.model_extra and done.model_extra["tandem"]["rounds"] > 0  # the edge's figures ride along
    chunks = list(client.completions.create(model="tiny-edge", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="tiny-edge", messages=messages, max_tokens=12,  # type: ignore[arg-type]
                                          temperature=0)
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tiny-edge", messages=messages, max_tokens=12,  # type: ignore[arg-type]
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

    with httpx.stream("POST", endpoint + "/v1/completions", timeout=30,
                      json={"model": "tiny-edge", "prompt": prompt, "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert httpx.get(endpoint + "/health", timeout=5).json() == {"status": "ok"}
    assert "tandem_spec_decode_num_drafts_total" in httpx.get(endpoint + "/metrics", timeout=5).text


def test_bad_input_on_the_edge_gets_the_clouds_statuses(endpoint: str) -> None:
    def check(r: httpx.Response, status: int, code: str) -> None:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"]

    def post(body: object, path: str = "/v1/completions") -> httpx.Response:
        return httpx.post(endpoint + path, json=body, timeout=30)

    ok = {"model": "tiny-edge", "prompt": PROMPT, "max_tokens": 4}
    check(post(ok | {"temperature": -1}), 400, "invalid_request")
    check(post(ok | {"temperature": 1e-40}), 400, "invalid_request")
    check(post(ok | {"max_tokens": 0}), 400, "invalid_request")
    check(post(ok | {"max_tokens": 10_000}), 400, "invalid_request")
    check(post(ok | {"prompt": [10_000]}), 400, "invalid_request")
    check(post(ok | {"prompt": [5] * 300}), 400, "context_length_exceeded")
    check(post(ok | {"prompt": [5] * 100}), 400, "context_length_exceeded")  # the cloud's own limit, relayed
    check(post(ok | {"model": "gpt-9"}), 404, "model_not_found")
    check(post({"prompt": PROMPT}), 400, "invalid_request")
    check(httpx.post(endpoint + "/v1/completions", content=b"{not json", timeout=10), 400, "invalid_request")
    check(httpx.post(endpoint + "/v1/completions", content=b"x" * 100_000, timeout=10), 413, "request_too_large")
    check(post({"model": "tiny-edge", "messages": []}, "/v1/chat/completions"), 400, "invalid_request")
    check(httpx.get(endpoint + "/v1/nothing", timeout=10), 404, "not_found")
    assert post(ok | {"temperature": 0}).status_code == 200  # still serving


def test_the_draft_runs_only_on_the_edge_model_thread(endpoint: str, tiny_draft: LoadedModel) -> None:
    threads: set[str] = set()
    hook = tiny_draft.model.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    try:
        body = {"model": "tiny-edge", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
        with httpx.stream("POST", endpoint + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and list(r.iter_lines())
    finally:
        hook.remove()
    assert threads and all(name.startswith("tandem-edge-draft") for name in threads), threads
