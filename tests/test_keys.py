"""API keys: several, from the environment and a file; Bearer on HTTP, metadata on gRPC; a 401 / UNAUTHENTICATED
that says the same few words whatever failed and echoes nothing; health, readiness and metrics stay public."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc

PROMPT = [10, 20, 30, 40]
ENV_KEYS = ["env-key-1", "env-key-2"]
FILE_KEYS = ["file-key-1", "file-key-2"]
KEY_FILE = "# keys for the test\n\nfile-key-1\n   file-key-2   \n# retired-key\nenv-key-1\n"
# wrong in every way we can think of; none may pass and none may be echoed
BAD = ["", "Bearer", "Bearer wrong-key", "Basic env-key-1", "env-key-1", "Bearer env-key-1x",
       "Bearer env-key", "Bearer retired-key", "Bearer # keys for the test", "bearer  FILE-KEY-1"]


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(KEY_FILE)
    return path


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel, key_file: Path) -> Iterator[ServerHandle]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_API_KEYS", ",".join(ENV_KEYS))
    mp.setenv("TANDEM_API_KEYS_FILE", str(key_file))
    try:
        s = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, max_prompt_tokens=64,
                           max_draft_tokens=8, max_tokens_limit=64, shutdown_grace_s=0.5)
    finally:
        mp.undo()
    with BackgroundServer(s, tiny_target) as handle:
        yield handle


def test_keys_from_env_and_file_are_merged(server: ServerHandle, key_file: Path) -> None:
    assert server.worker.settings.api_keys == ENV_KEYS + FILE_KEYS  # env first; the duplicate once; comments skipped
    with pytest.raises(ValueError, match="API keys file"):
        ServerSettings(api_keys_file=key_file.parent / "missing.txt")
    edge = EdgeSettings(edge_api_keys="a, b", edge_api_keys_file=key_file)
    assert edge.edge_api_keys == ["a", "b", *FILE_KEYS, "env-key-1"]


def test_http_every_key_works_and_bad_ones_get_one_bland_401(server: ServerHandle) -> None:
    base = f"http://127.0.0.1:{server.http_port}"
    for key in ENV_KEYS + FILE_KEYS:
        r = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200, (key, r.text)
    bodies = set()
    for auth in BAD:
        r = httpx.get(base + "/v1/models", headers={"Authorization": auth} if auth else {}, timeout=10)
        assert r.status_code == 401, auth
        bodies.add(r.text)
        for secret in [*ENV_KEYS, *FILE_KEYS, "wrong-key", "retired-key", "env-key"]:
            assert secret not in r.text
    assert len(bodies) == 1  # nothing tells a missing header from a wrong scheme or a wrong key
    assert httpx.post(base + "/v1/sessions", json={"prompt": PROMPT}, timeout=10).status_code == 401
    assert httpx.delete(base + "/v1/sessions/x", timeout=10).status_code == 401  # before "not found": no probing
    # a non-ASCII key compared as str raised a TypeError (a 500) before the comparison went to bytes
    r = httpx.get(base + "/v1/models", headers=[(b"Authorization", b"Bearer \xe9t\xe9")], timeout=10)
    assert r.status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(base + path, timeout=10).status_code == 200, path


def test_grpc_every_key_works_and_bad_ones_get_one_bland_status(server: ServerHandle) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = pb_grpc.VerifierStub(ch)
        request = pb.Open(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=2))
        for key in ENV_KEYS + FILE_KEYS:
            opened = stub.OpenSession(request, timeout=10, metadata=(("authorization", f"Bearer {key}"),))
            stub.CloseSession(pb.Close(session_id=opened.session_id), timeout=10,
                              metadata=(("authorization", f"Bearer {key}"),))
        details = set()
        calls = [
            lambda md: stub.OpenSession(request, timeout=10, metadata=md),
            lambda md: stub.Verify(pb.VerifyRequest(session_id="x", draft=pb.Draft()), timeout=10, metadata=md),
            lambda md: stub.CloseSession(pb.Close(session_id="x"), timeout=10, metadata=md),
            lambda md: list(stub.Generate(request, timeout=10, metadata=md)),
            lambda md: list(stub.Session(iter([pb.ClientMessage(open=request)]), timeout=10, metadata=md)),
        ]
        for auth in BAD:
            metadata = (("authorization", auth),) if auth else ()
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (auth, info.value.details())
                details.add(info.value.details())
        assert len(details) == 1
        assert not any(k in d for d in details for k in [*ENV_KEYS, *FILE_KEYS, "wrong-key"])
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # public


def test_edge_endpoint_keys_from_env_and_file(
    server: ServerHandle, tiny_draft: LoadedModel, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_EDGE_API_KEYS", "edge-env-key")
    monkeypatch.setenv("TANDEM_EDGE_API_KEYS_FILE", str(key_file))
    settings = EdgeSettings(cloud=f"127.0.0.1:{server.grpc_port}", api_key=FILE_KEYS[0], port=0, timeout_s=10,
                            retries=0, gamma=3)
    with BackgroundEdge(settings, tiny_draft) as port:
        base = f"http://127.0.0.1:{port}"
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        for key in ["edge-env-key", *FILE_KEYS]:
            r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                           timeout=60)
            assert r.status_code == 200, r.text
        texts = set()
        for auth in BAD:
            r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": auth} if auth else {},
                           timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
            texts.add(r.text)
        assert len(texts) == 1 and "key-" not in texts.pop()
        for path in ("/health", "/metrics"):
            assert httpx.get(base + path, timeout=10).status_code == 200
