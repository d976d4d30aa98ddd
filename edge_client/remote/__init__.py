"""Remote verifiers: the cloud's target behind gRPC (streaming or unary) or HTTP, as `tandem.messages.Verifier`s.

Synchronous, like the loop that drives them; every call carries a deadline; failures raise `RemoteError` with the
server's error code and the transport status. Sessions pipeline (`send` / `recv`, answered in order), carry an
affinity key in the `x-tandem-session` header (docs/scale-out.md), and count their payload bytes; a verifier's
`generate` is the cloud's own stream (the target alone).
"""

from __future__ import annotations

from edge_client.remote.common import AFFINITY_HEADER
from edge_client.remote.grpc_verifier import GrpcStreamSession, GrpcUnarySession, GrpcVerifier, grpc_channel
from edge_client.remote.http_verifier import HttpSession, HttpVerifier, http_verify
from tandem.errors import RemoteError

__all__ = ["AFFINITY_HEADER", "GrpcStreamSession", "GrpcUnarySession", "GrpcVerifier", "HttpSession", "HttpVerifier",
           "RemoteError", "grpc_channel", "http_verify"]
