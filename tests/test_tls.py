"""TLS: the cloud serves HTTPS and gRPC over TLS from certificate paths; the edge verifies the cloud's certificate
against a custom CA (a wrong CA fails at once, naming TLS) and can serve its own endpoint over HTTPS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from certs import Certs, make_certs
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.client import edge_decoder
from edge_client.remote import GrpcVerifier, RemoteError
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc

PROMPT = [10, 20, 30, 40, 50, 60, 70]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
KEY = "tls-test-key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A second, unrelated CA: the cloud's certificate does not chain to it."""
    return make_certs(tmp_path_factory.mktemp("other"), ca_name="someone else's CA")


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel, certs: Certs) -> Iterator[ServerHandle]:
    s = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, api_keys=[KEY],
                       max_prompt_tokens=64, max_draft_tokens=8, max_tokens_limit=64, shutdown_grace_s=0.5,
                       tls_cert_file=certs.cert_file, tls_key_file=certs.key_file)
    with BackgroundServer(s, tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module")
def expected(tiny_target: LoadedModel) -> list[int]:
    return generate_autoregressive(tiny_target, PROMPT, GREEDY).tokens


def edge(h: ServerHandle, transport: str, ca: Path | None, **kw: object) -> EdgeSettings:
    port = h.http_port if transport == "http" else h.grpc_port
    base: dict[str, object] = dict(cloud=f"127.0.0.1:{port}", transport=transport, tls=True, tls_ca_file=ca,
                                   api_key=KEY, timeout_s=10, retries=3, backoff_s=0.05, gamma=3)
    return EdgeSettings(**(base | kw))


def test_settings_need_both_cert_and_key(certs: Certs) -> None:
    with pytest.raises(ValueError, match="tls_key_file"):
        ServerSettings(tls_cert_file=certs.cert_file)
    with pytest.raises(ValueError, match="edge_tls_cert_file"):
        EdgeSettings(edge_tls_key_file=certs.key_file)
    assert EdgeSettings(cloud="https://cloud:50051").cloud_tls and not EdgeSettings().cloud_tls


def test_https_with_the_custom_ca_and_not_without(server: ServerHandle, certs: Certs) -> None:
    for host in ("127.0.0.1", "localhost"):
        url = f"https://{host}:{server.http_port}"
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        assert httpx.get(url + "/health", verify=ctx, timeout=10).json() == {"status": "ok"}
        r = httpx.get(url + "/v1/models", verify=ctx, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{server.http_port}/health", timeout=10)  # the system CAs do not know ours
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=10)  # plain HTTP on the TLS port


def test_grpc_over_tls(server: ServerHandle, certs: Certs) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=certs.ca_file.read_bytes())
    with grpc.secure_channel(f"localhost:{server.grpc_port}", creds) as ch:
        stub = pb_grpc.VerifierStub(ch)
        opened = stub.OpenSession(pb.Open(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=4)), timeout=10,
                                  metadata=(("authorization", f"Bearer {KEY}"),))
        assert opened.prompt_tokens == len(PROMPT)
        with pytest.raises(grpc.RpcError) as info:  # TLS does not replace the key
            stub.CloseSession(pb.Close(session_id=opened.session_id), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.VerifierStub(ch).CloseSession(pb.Close(session_id="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # a plain client cannot talk to the TLS port


@pytest.mark.parametrize("transport", ["grpc", "grpc-unary", "http"])
def test_edge_verifies_the_cloud_with_a_custom_ca(
    server: ServerHandle, tiny_draft: LoadedModel, certs: Certs, expected: list[int], transport: str
) -> None:
    result = edge_decoder(edge(server, transport, certs.ca_file), tiny_draft).generate(PROMPT, GREEDY)
    assert result.tokens == expected


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_wrong_ca_fails_at_once_naming_tls(
    server: ServerHandle, tiny_draft: LoadedModel, other_ca: Certs, transport: str
) -> None:
    settings = edge(server, transport, other_ca.ca_file, retries=5, backoff_s=2.0)
    with pytest.raises(RemoteError) as info:
        edge_decoder(settings, tiny_draft).generate(PROMPT, GREEDY)
    assert info.value.code == "tls_error" and "TLS" in str(info.value)
    assert "unreachable after" not in str(info.value)  # not retried: with 5 retries at 2 s the test would time out


def test_the_system_cas_refuse_a_private_ca(server: ServerHandle) -> None:
    with GrpcVerifier(f"https://127.0.0.1:{server.grpc_port}", api_key=KEY, timeout_s=10) as v, \
            pytest.raises(RemoteError) as info:
        v.open(PROMPT, GREEDY)
    assert info.value.code == "tls_error"


def test_edge_endpoint_over_https(
    server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel, certs: Certs, expected: list[int]
) -> None:
    settings = edge(server, "grpc", certs.ca_file, port=0, edge_tls_cert_file=certs.cert_file,
                    edge_tls_key_file=certs.key_file, edge_api_keys="edge-key")
    with BackgroundEdge(settings, tiny_draft) as port:
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        url = f"https://localhost:{port}"
        assert httpx.get(url + "/health", verify=ctx, timeout=10).status_code == 200
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        r = httpx.post(url + "/v1/completions", json=body, verify=ctx, timeout=60,
                       headers={"Authorization": "Bearer edge-key"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=10)
