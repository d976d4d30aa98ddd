"""The edge client: the core's speculative loop, its draft model here, its verifier the cloud over the wire.

`edge_decoder(...).generate` is one request (modes spec, cloud, edge, auto; pipelining, draft trees, adaptive
gamma, resume and fallback are the loop's: `tandem.speculate`). This module only says how to reach the cloud.
"""

from __future__ import annotations

from typing import Any

from edge_client.remote import GrpcVerifier, HttpVerifier
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem.speculate import SpeculativeDecoder


def edge_decoder(settings: EdgeSettings, draft: LoadedModel) -> SpeculativeDecoder:
    """One edge: the core's loop with this draft model, a fresh verifier of the cloud for each attempt."""
    return SpeculativeDecoder(settings, draft, lambda: make_verifier(settings, draft))


def make_verifier(settings: EdgeSettings, draft: LoadedModel) -> GrpcVerifier | HttpVerifier:
    s = settings
    ca = None if s.tls_ca_file is None else str(s.tls_ca_file)
    common: dict[str, Any] = dict(timeout_s=s.timeout_s, api_key=s.api_key, draft_fingerprint=draft.fingerprint,
                                  draft_name=draft.name, client_id=s.client_id, tls_ca_file=ca)
    if s.transport == "http":
        scheme = "https" if s.cloud_tls else "http"
        url = s.cloud if s.cloud.startswith(("http://", "https://")) else f"{scheme}://{s.cloud}"
        return HttpVerifier(url, **common)
    return GrpcVerifier(s.cloud, streaming=s.transport == "grpc", tls=s.cloud_tls, **common)
