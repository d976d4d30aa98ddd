"""Remote verifiers: the cloud's target behind gRPC (streaming or unary) or HTTP, as `tandem.messages.Verifier`s.

Synchronous, like the generation loop that drives them. Every call carries a deadline. Failures raise `RemoteError`
with the server's error code (invalid_request, session_not_found, tokenizer_mismatch, over_capacity, ...) and the
transport status.

Resume after a cloud restart: open a new session with prompt = original prompt + tokens emitted so far and
max_tokens reduced by their number (optionally under the old `session_id`).

Behind a load balancer: `open(..., affinity_key=K)` sends K in the `x-tandem-session` header (gRPC metadata) on every
call of that session; the balancer hashes it to keep the session on one replica (deploy/nginx). The edge uses one
key per generation, kept across resumes (tandem.speculate).

Pipelined rounds: every session also has `send(block, base_len)` and `recv()`, answered in order, so a block can be
sent ahead while the previous one is being verified. Each session counts the payload bytes it sent and received.
`generate` on a verifier is the cloud's own streaming generation (the target alone): the cloud-only baseline.
"""

from __future__ import annotations

from edge_client.remote.common import AFFINITY_HEADER
from edge_client.remote.grpc_verifier import GrpcStreamSession, GrpcUnarySession, GrpcVerifier, grpc_channel
from edge_client.remote.http_verifier import HttpSession, HttpVerifier, http_verify
from tandem.errors import RemoteError

__all__ = ["AFFINITY_HEADER", "GrpcStreamSession", "GrpcUnarySession", "GrpcVerifier", "HttpSession", "HttpVerifier",
           "RemoteError", "grpc_channel", "http_verify"]
