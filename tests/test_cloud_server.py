"""The cloud verifier against real servers on free loopback ports, with tiny random-weight models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from servers import BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.remote import GrpcVerifier, HttpVerifier, RemoteError
from tandem.blocks import DraftBlock, VerifyResult
from tandem.drafting import ModelDrafter
from tandem.errors import CapacityError, SessionConflictError
from tandem.local import LocalVerifier
from tandem.messages import VerifierSession
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_protocol.errors import ShuttingDownError
from tandem_protocol.openai_api.text import IncrementalText
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
PROMPT = [10, 20, 30, 40, 50, 60, 70]


def one_block(session: VerifierSession, block: DraftBlock) -> VerifyResult:
    session.send(block)
    return session.recv()


def settings(**kw: object) -> ServerSettings:
    base: dict[str, object] = dict(
        target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, api_keys=[KEY], max_prompt_tokens=64,
        max_draft_tokens=8, max_tokens_limit=64, max_body_bytes=64 * 1024, shutdown_grace_s=1.0,
    )
    return ServerSettings(**(base | kw))


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    with BackgroundServer(settings(), tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module")
def tight(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    """Small limits: one session, one request at a time, short TTL."""
    s = settings(api_keys=[], max_sessions=1, max_concurrent_requests=1, session_ttl_s=0.5)
    with BackgroundServer(s, tiny_target) as handle:
        yield handle


def http(h: ServerHandle) -> str:
    return f"http://127.0.0.1:{h.http_port}"


def grpc_addr(h: ServerHandle) -> str:
    return f"127.0.0.1:{h.grpc_port}"


def metric(h: ServerHandle, name: str) -> float:
    """Sum of a metric's samples over all labels, read through /metrics."""
    total = 0.0
    for line in httpx.get(http(h) + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def decode(model: LoadedModel, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --- health, readiness, reflection, metrics


def test_health_readiness_and_reflection(server: ServerHandle) -> None:
    assert httpx.get(http(server) + "/health", timeout=5).json() == {"status": "ok"}
    assert httpx.get(http(server) + "/ready", timeout=5).status_code == 200
    with grpc.insecure_channel(grpc_addr(server)) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tandem.v1.Verifier"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"tandem.v1.Verifier", "grpc.health.v1.Health"} <= names


# --- the OpenAI-compatible API: the target alone


def test_openai_client_completions_and_chat(server: ServerHandle, tiny_target: LoadedModel) -> None:
    client = openai.OpenAI(base_url=http(server) + "/v1", api_key=KEY, timeout=30, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "def add(a, b):"
    ids = tiny_target.tokenizer.encode(prompt, add_special_tokens=False)
    expected = decode(tiny_target, generate_autoregressive(tiny_target, ids, SamplingParams(max_tokens=12)).tokens)

    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == expected  # no chat template: the messages' text is the prompt
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)


def test_raw_sse_ends_with_done_and_stop_strings_cut(server: ServerHandle, tiny_target: LoadedModel) -> None:
    ids = PROMPT
    full = decode(tiny_target, generate_autoregressive(tiny_target, ids, SamplingParams(max_tokens=16,
                                                                                        ignore_eos=True)).tokens)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stop": [stop],
            "stream": True}
    with httpx.stream("POST", http(server) + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    r = httpx.post(http(server) + "/v1/completions", json=body | {"stream": False}, headers=AUTH, timeout=30)
    assert r.json()["choices"][0]["text"] == full[: full.find(stop)]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_incremental_text_keeps_multibyte_characters_whole() -> None:
    from transformers import AutoTokenizer

    from tandem.models import find_test_pair

    tok = AutoTokenizer.from_pretrained(find_test_pair() / "tokenizer")
    text = "s = 'héllo ✓ 日本語 🙂'  # done"
    ids = tok.encode(text, add_special_tokens=False)
    stream = IncrementalText(tok)
    deltas = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any("\ufffd" in d for d in deltas)
    stream = IncrementalText(tok, stop=["日本"])
    out = "".join(stream.push([i]) for i in ids)
    assert out == "s = 'héllo ✓ " and stream.stopped


# --- verification sessions driven by the foundation's loop


@pytest.mark.parametrize("transport", ["grpc-stream", "grpc-unary", "http"])
def test_remote_speculative_greedy_equals_target_alone(
    server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel, transport: str
) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = generate_autoregressive(tiny_target, PROMPT, params).tokens
    verifier = make_verifier(server, transport, tiny_draft.fingerprint)
    try:
        got = generate_speculative(ModelDrafter(tiny_draft), verifier, PROMPT, params, gamma=4)
    finally:
        verifier.close()
    assert got.tokens == expected
    assert got.stats.accepted > 0  # the draft is a noisy copy: some blocks are accepted


def test_remote_sampling_matches_local_verifier_with_same_seed(
    server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel
) -> None:
    """The sparse q crosses the wire exactly: a seeded sampled run is token for token the in-process one."""
    params = SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    local = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), PROMPT, params, gamma=3)
    for transport in ("grpc-stream", "http"):
        verifier = make_verifier(server, transport, tiny_draft.fingerprint)
        try:
            remote = generate_speculative(ModelDrafter(tiny_draft), verifier, PROMPT, params, gamma=3)
        finally:
            verifier.close()
        assert remote.tokens == local.tokens


def make_verifier(h: ServerHandle, transport: str, fingerprint: str = "") -> GrpcVerifier | HttpVerifier:
    if transport == "http":
        return HttpVerifier(http(h), api_key=KEY, timeout_s=30, draft_fingerprint=fingerprint, client_id="test")
    return GrpcVerifier(grpc_addr(h), streaming=transport == "grpc-stream", api_key=KEY, timeout_s=30,
                        draft_fingerprint=fingerprint, client_id="test")


@pytest.mark.parametrize("transport", ["grpc-stream", "grpc-unary", "http"])
def test_a_verdict_says_how_long_it_waited_for_the_model(server: ServerHandle, transport: str) -> None:
    with make_verifier(server, transport) as verifier:
        session = verifier.open(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
        session.send(DraftBlock([5, 6]))
        verdict = session.recv()
        session.close()
    assert verdict.server_ms > 0 and 0 <= verdict.queue_ms <= verdict.server_ms


def test_metrics_move_when_work_is_done(server: ServerHandle, tiny_target: LoadedModel,
                                        tiny_draft: LoadedModel) -> None:
    names = ["tandem_spec_decode_num_drafts_total", "tandem_spec_decode_num_draft_tokens_total",
             "tandem_spec_decode_num_accepted_tokens_total", "tandem_spec_decode_num_accepted_tokens_per_pos_total",
             "tandem_target_forward_passes_total", "tandem_verify_latency_seconds_count", "tandem_requests_total",
             "tandem_time_to_first_token_seconds_count", "tandem_time_per_output_token_seconds_count"]
    before = {n: metric(server, n) for n in names}
    with GrpcVerifier(grpc_addr(server), streaming=False, api_key=KEY, timeout_s=30) as verifier:
        session = verifier.open(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
        assert metric(server, "tandem_open_sessions") == 1
        drafter = ModelDrafter(tiny_draft)
        drafter.start(PROMPT, SamplingParams(max_tokens=8))
        result = one_block(session, drafter.propose(PROMPT, 4))
        session.close()
    assert metric(server, "tandem_open_sessions") == 0
    httpx.post(http(server) + "/v1/completions", headers=AUTH, timeout=30,
               json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    after = {n: metric(server, n) for n in names}
    assert after["tandem_spec_decode_num_drafts_total"] == before["tandem_spec_decode_num_drafts_total"] + 1
    assert after["tandem_spec_decode_num_draft_tokens_total"] == before["tandem_spec_decode_num_draft_tokens_total"] + 4
    accepted = "tandem_spec_decode_num_accepted_tokens_total"
    assert after[accepted] - before[accepted] == result.num_accepted
    per_pos = "tandem_spec_decode_num_accepted_tokens_per_pos_total"
    assert after[per_pos] - before[per_pos] == result.num_accepted
    for n in names[4:]:
        assert after[n] > before[n], n


# --- bad input: a clear status, never a 500, and the server keeps serving


def test_http_bad_inputs_get_their_status(server: ServerHandle, tiny_target: LoadedModel) -> None:
    base = http(server)

    def post(path: str, body: object = None, headers: dict[str, str] = AUTH, **kw: object) -> httpx.Response:
        return httpx.post(base + path, json=body, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    def check(r: httpx.Response, status: int, code: str) -> dict[str, str]:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"]
        return err

    completion = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
    check(post("/v1/completions", completion, headers={}), 401, "unauthenticated")
    check(post("/v1/completions", completion, headers={"Authorization": "Bearer wrong"}), 401, "unauthenticated")
    check(post("/v1/completions", completion | {"temperature": -1}), 400, "invalid_request")
    check(post("/v1/completions", completion | {"temperature": 1e-40}), 400, "invalid_request")
    check(post("/v1/completions", completion | {"max_tokens": 0}), 400, "invalid_request")
    check(post("/v1/completions", completion | {"max_tokens": 10_000}), 400, "invalid_request")
    check(post("/v1/completions", completion | {"prompt": [10_000]}), 400, "invalid_request")
    check(post("/v1/completions", completion | {"prompt": [5] * 100}), 400, "context_length_exceeded")
    check(post("/v1/completions", completion | {"model": "gpt-9"}), 404, "model_not_found")
    check(post("/v1/completions", {"prompt": PROMPT}), 400, "invalid_request")
    check(httpx.post(base + "/v1/completions", content=b"{not json", headers=AUTH, timeout=10), 400,
          "invalid_request")
    check(httpx.post(base + "/v1/completions", content=b"x" * 100_000, headers=AUTH, timeout=10), 413,
          "request_too_large")
    check(post("/v1/chat/completions", {"model": "tiny", "messages": []}), 400, "invalid_request")

    check(post("/v1/sessions", {"prompt": []}), 400, "invalid_request")
    check(post("/v1/sessions", {"prompt": PROMPT, "sampling": {"top_p": 2}}), 400, "invalid_request")
    err = check(post("/v1/sessions", {"prompt": PROMPT, "draft_fingerprint": "0123456789abcdef"}), 409,
                "tokenizer_mismatch")
    assert "0123456789abcdef" in err["message"] and tiny_target.fingerprint in err["message"]
    check(post("/v1/sessions/nope/verify", {"seq": 0, "tokens": [1]}), 404, "session_not_found")
    check(httpx.delete(base + "/v1/sessions/nope", headers=AUTH, timeout=10), 404, "session_not_found")

    sid = post("/v1/sessions", {"prompt": PROMPT, "sampling": {"max_tokens": 8, "temperature": 1, "seed": 1}}).json()[
        "session_id"]
    verify = f"/v1/sessions/{sid}/verify"
    check(post(verify, {"seq": 0, "tokens": [1] * 9}), 400, "invalid_request")  # longer than max_draft_tokens
    check(post(verify, {"seq": 0, "tokens": [500]}), 400, "invalid_request")
    check(post(verify, {"seq": 0, "tokens": [1, 2], "q_k": 1, "q_ids": [1]}), 400, "invalid_request")
    check(post(verify, {"seq": 0, "tokens": [1], "q_k": 1, "q_ids": [2], "q_probs": [1.0]}), 400, "invalid_request")
    check(post(verify, {"seq": 0, "tokens": [1], "q_k": 1, "q_ids": [1], "q_probs": [-1.0]}), 400, "invalid_request")
    check(post(verify, {"seq": 5, "tokens": [1]}), 409, "session_conflict")
    # the session survived every bad draft
    first = post(verify, {"seq": 0, "tokens": [1, 2], "q_k": 2, "q_ids": [1, 3, 2, 4], "q_probs": [0.5] * 4})
    assert first.status_code == 200, first.text
    assert post(verify, {"seq": 0, "tokens": [1, 2]}).json() == first.json()  # a retry gets the same verdict
    assert httpx.delete(base + f"/v1/sessions/{sid}", headers=AUTH, timeout=10).status_code == 200

    check(httpx.get(base + "/v1/nothing", headers=AUTH, timeout=10), 404, "not_found")
    assert httpx.get(base + "/metrics", timeout=10).status_code == 200  # public
    ok = post("/v1/completions", completion | {"temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_grpc_bad_inputs_get_their_status(server: ServerHandle, tiny_target: LoadedModel) -> None:
    params = pb.SamplingParams(max_tokens=8)
    with grpc.insecure_channel(grpc_addr(server)) as ch:
        stub = pb_grpc.VerifierStub(ch)

        def fails(status: grpc.StatusCode, call: object, request: object, metadata: object = GRPC_AUTH) -> str:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10, metadata=metadata)  # type: ignore[operator]
            assert info.value.code() == status, info.value.details()
            return str(info.value.details())

        fails(grpc.StatusCode.UNAUTHENTICATED, stub.OpenSession, pb.Open(prompt=PROMPT, sampling=params), ())
        fails(grpc.StatusCode.INVALID_ARGUMENT, stub.OpenSession,
              pb.Open(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=8, temperature=-1)))
        fails(grpc.StatusCode.INVALID_ARGUMENT, stub.OpenSession, pb.Open(prompt=[999], sampling=params))
        fails(grpc.StatusCode.INVALID_ARGUMENT, stub.OpenSession, pb.Open(prompt=PROMPT))  # max_tokens 0
        details = fails(grpc.StatusCode.FAILED_PRECONDITION, stub.OpenSession,
                        pb.Open(prompt=PROMPT, sampling=params, draft_fingerprint="feedfacefeedface"))
        assert "feedfacefeedface" in details and tiny_target.fingerprint in details
        fails(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.OpenSession, pb.Open(prompt=[100_000] * 40_000, sampling=params))
        fails(grpc.StatusCode.NOT_FOUND, stub.Verify, pb.VerifyRequest(session_id="nope", draft=pb.Draft()))
        fails(grpc.StatusCode.NOT_FOUND, stub.CloseSession, pb.Close(session_id="nope"))

        opened = stub.OpenSession(pb.Open(prompt=PROMPT, sampling=params), timeout=10, metadata=GRPC_AUTH)
        fails(grpc.StatusCode.INVALID_ARGUMENT, stub.Verify,
              pb.VerifyRequest(session_id=opened.session_id, draft=pb.Draft(seq=0, tokens=[4000])))
        verdict = stub.Verify(pb.VerifyRequest(session_id=opened.session_id, draft=pb.Draft(seq=0, tokens=[1])),
                              timeout=10, metadata=GRPC_AUTH)
        assert verdict.generated == len(verdict.tokens) >= 1
        stub.CloseSession(pb.Close(session_id=opened.session_id), timeout=10, metadata=GRPC_AUTH)

        # on a stream, a bad message is answered by an Error and the stream carries on
        def messages() -> Iterator[pb.ClientMessage]:
            yield pb.ClientMessage(open=pb.Open(prompt=PROMPT, sampling=params))
            yield pb.ClientMessage(draft=pb.Draft(seq=0, tokens=[4000]))
            yield pb.ClientMessage(draft=pb.Draft(seq=0, tokens=[1, 2]))
            yield pb.ClientMessage(close=pb.Close())

        replies = list(stub.Session(messages(), timeout=30, metadata=GRPC_AUTH))
        assert [r.WhichOneof("msg") for r in replies] == ["opened", "error", "verdict"]
        assert replies[1].error.code == "invalid_request" and replies[1].error.grpc_status == "INVALID_ARGUMENT"
    assert metric(server, "tandem_open_sessions") == 0


def test_capacity_limits_and_ttl(tight: ServerHandle, tiny_target: LoadedModel) -> None:
    params = SamplingParams(max_tokens=8)
    with GrpcVerifier(grpc_addr(tight), streaming=False, timeout_s=10) as verifier:
        first = verifier.open(PROMPT, params)
        with pytest.raises(RemoteError) as info:
            verifier.open(PROMPT, params)
        assert info.value.code == "over_capacity" and info.value.status == "RESOURCE_EXHAUSTED"
        time.sleep(1.2)  # past the TTL: evicted
        with pytest.raises(RemoteError) as info:
            one_block(first, DraftBlock([]))
        assert info.value.code == "session_not_found"
        verifier.open(PROMPT, params).close()  # the slot is free again

    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with tight.worker.admit():  # a request in flight holds the only admission slot
        busy = httpx.post(http(tight) + "/v1/completions", json=body, timeout=30)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "over_capacity"
        with GrpcVerifier(grpc_addr(tight), timeout_s=10) as verifier, pytest.raises(RemoteError) as info:
            verifier.open(PROMPT, params)
        assert info.value.code == "over_capacity"
    assert httpx.post(http(tight) + "/v1/completions", json=body, timeout=30).status_code == 200


# --- resume after a restart


def test_resume_after_restart_gives_identical_output(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    expected = generate_autoregressive(tiny_target, PROMPT, params).tokens

    first = BackgroundServer(settings(), tiny_target)
    h1 = first.start()
    verifier = GrpcVerifier(grpc_addr(h1), api_key=KEY, timeout_s=10)
    session = verifier.open(PROMPT, params)
    drafter = ModelDrafter(tiny_draft)
    drafter.start(PROMPT, params)
    out: list[int] = []
    for _ in range(3):
        block = drafter.propose(PROMPT + out, 3)
        result = one_block(session, block)
        drafter.learn(PROMPT + out, block, result)
        out.extend(result.tokens)
    first.stop(grace=0.2)  # the cloud goes away mid-session
    with pytest.raises(RemoteError):
        one_block(session, drafter.propose(PROMPT + out, 3))
    verifier.close()
    assert 0 < len(out) < params.max_tokens

    rest_params = dataclasses.replace(params, max_tokens=params.max_tokens - len(out))
    with BackgroundServer(settings(), tiny_target) as h2:
        for transport in ("grpc-stream", "http"):
            verifier = make_verifier(h2, transport)
            try:
                rest = generate_speculative(ModelDrafter(tiny_draft), verifier, PROMPT + out, rest_params, gamma=3)
            finally:
                verifier.close()
            assert out + rest.tokens == expected
        # resuming under the old id
        with HttpVerifier(http(h2), api_key=KEY) as hv:
            resumed = hv.open(PROMPT + out, rest_params, session_id="edge-1")
            assert resumed.opened.resumed and resumed.session_id == "edge-1"
            resumed.close()


async def test_worker_bounds_session_memory_and_replaces_a_resumed_id(tiny_target: LoadedModel) -> None:
    """The worker alone, no transport: the KV-memory bound, and a resume replacing a live session of that id."""
    from cloud_server.worker import ModelWorker, OpenRequest, kv_bytes_per_token
    from tandem_protocol.metrics import Metrics

    per_session = (len(PROMPT) + 8 + 8 + 1) * kv_bytes_per_token(tiny_target)  # prompt + max_tokens + draft + 1
    worker = ModelWorker(tiny_target, settings(max_session_memory_mb=1.5 * per_session / 2**20), Metrics())
    await worker.start()
    try:
        params = SamplingParams(max_tokens=8)
        first = await worker.open_session(OpenRequest(PROMPT, params, session_id="a"))
        with pytest.raises(CapacityError, match="KV memory"):
            await worker.open_session(OpenRequest(PROMPT, params))
        again = await worker.open_session(OpenRequest(PROMPT, params, session_id="a"))
        assert first.session_id == again.session_id == "a" and again.resumed and worker.open_sessions == 1
        verdict = await worker.verify("a", 0, DraftBlock([]))
        assert verdict.generated == 1 and verdict.num_accepted == 0 and len(verdict.tokens) == 1
    finally:
        await worker.shutdown()
    with pytest.raises(ShuttingDownError):
        await worker.open_session(OpenRequest(PROMPT, SamplingParams(max_tokens=8)))



async def test_a_draft_sent_ahead_learns_at_once_that_its_session_closed(tiny_target: LoadedModel) -> None:
    from cloud_server.worker import ModelWorker, OpenRequest
    from tandem_protocol.metrics import Metrics

    worker = ModelWorker(tiny_target, settings(), Metrics())
    await worker.start()
    try:
        opened = await worker.open_session(OpenRequest(PROMPT, SamplingParams(max_tokens=8)))
        ahead = asyncio.create_task(worker.verify(opened.session_id, 1, DraftBlock([]), base_len=len(PROMPT) + 1))
        await asyncio.sleep(0.05)
        assert not ahead.done()  # waiting for seq 0
        await worker.close_session(opened.session_id)
        with pytest.raises(SessionConflictError, match="has ended"):
            await asyncio.wait_for(ahead, 5)  # not the 30 s pipeline wait
    finally:
        await worker.shutdown()

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                       max_size=2), max_leaves=6)
_COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
                      "messages", "stream_options", "ignore_eos"]
_SESSION_FIELDS = ["prompt", "sampling", "draft_fingerprint", "session_id", "seq", "tokens", "q_k", "q_ids", "q_probs"]
_SAMPLING_FIELDS = ["max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos"]


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    completion=st.dictionaries(st.sampled_from(_COMPLETION_FIELDS), _values | st.floats(0, 1e-30), max_size=3),
    session=st.dictionaries(st.sampled_from(_SESSION_FIELDS), _values, max_size=3),
    sampling=st.dictionaries(st.sampled_from(_SAMPLING_FIELDS), _values | st.floats(0, 1e-30), max_size=2),
)
def test_malformed_bodies_never_get_a_500(
    server: ServerHandle, completion: dict[str, object], session: dict[str, object], sampling: dict[str, object]
) -> None:
    client = httpx.Client(base_url=http(server), headers=AUTH | {"Content-Type": "application/json"}, timeout=30)

    def post(path: str, body: dict[str, object]) -> httpx.Response:
        return client.post(path, content=json.dumps(body))

    small = {"max_tokens": 2}
    for path, body in [
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, **small} | completion),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **small}
         | completion),
        ("/v1/sessions", {"prompt": PROMPT, "sampling": {"max_tokens": 4} | sampling} | session),
    ]:
        r = post(path, body)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["code"]
    opened = post("/v1/sessions", {"prompt": PROMPT, "sampling": {"max_tokens": 4, "temperature": 1.0, "seed": 0}})
    sid = opened.json()["session_id"]
    r = post(f"/v1/sessions/{sid}/verify", {"seq": 0, "tokens": [1, 2]} | session)
    assert r.status_code < 500, (session, r.text)
    client.delete(f"/v1/sessions/{sid}")
    client.close()


def test_the_model_runs_only_on_the_worker_thread(server: ServerHandle, tiny_target: LoadedModel) -> None:
    threads: set[str] = set()
    hook = tiny_target.model.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    try:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        assert httpx.post(http(server) + "/v1/completions", json=body, headers=AUTH, timeout=30).status_code == 200
        with GrpcVerifier(grpc_addr(server), api_key=KEY, timeout_s=30) as verifier:
            session = verifier.open(PROMPT, SamplingParams(max_tokens=4))
            one_block(session, DraftBlock([1, 2]))
            session.close()
    finally:
        hook.remove()
    assert threads and all(name.startswith("tandem-model") for name in threads), threads
