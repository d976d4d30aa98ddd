"""Remote verifiers: the cloud's target behind gRPC (streaming or unary) or HTTP, as `tandem.engine.Verifier`s.

Synchronous, like the generation loop that drives them. Every call carries a deadline. Failures raise `RemoteError`
with the server's error code (invalid_request, session_not_found, tokenizer_mismatch, over_capacity, ...) and the
transport status.

Resume after a cloud restart: open a new session with prompt = original prompt + tokens emitted so far and
max_tokens reduced by their number (optionally under the old `session_id`).

Behind a load balancer: `open(..., affinity_key=K)` sends K in the `x-tandem-session` header (gRPC metadata) on every
call of that session; the balancer hashes it to keep the session on one replica (deploy/nginx). The edge uses one
key per generation, kept across resumes (edge_client.loop).

Pipelined rounds: every session also has `send(block, base_len)` and `recv()`, answered in order, so a block can be
sent ahead while the previous one is being verified. Each session counts the payload bytes it sent and received.
`generate` on a verifier is the cloud's own streaming generation (the target alone): the cloud-only baseline.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from cloud_server import wire
from cloud_server.proto import verifier_pb2 as pb
from cloud_server.proto import verifier_pb2_grpc as pb_grpc
from tandem.engine import DraftBlock, FinishReason, VerifyResult
from tandem.errors import TandemError
from tandem.sampling import SamplingParams

_GRPC_CODE_NAMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request",
    grpc.StatusCode.NOT_FOUND: "session_not_found",
    grpc.StatusCode.FAILED_PRECONDITION: "tokenizer_mismatch",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "over_capacity",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
}


class RemoteError(TandemError):
    """A failure reported by (or on the way to) the cloud verifier."""

    def __init__(self, code: str, message: str, status: str | int) -> None:
        super().__init__(f"{message} ({status})")
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Reply:
    result: VerifyResult
    server_ms: float  # the server's own time on the block; the rest of the wait is the network (and queueing)


@dataclass(frozen=True)
class Step:
    """One step of the cloud's own generation."""

    tokens: list[int]
    finish_reason: FinishReason | None


AFFINITY_HEADER = "x-tandem-session"  # HTTP header and gRPC metadata key (lowercase, as gRPC requires)
_TLS_HINT = "TLS: the cloud's certificate was not accepted (is it signed by tls_ca_file's CA, for this host?)"


def _from_rpc_error(e: grpc.RpcError) -> RemoteError:
    status = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    if status == grpc.StatusCode.UNAVAILABLE and _is_tls_failure(details):
        # not retried: a certificate the edge refuses stays refused
        return RemoteError("tls_error", f"{_TLS_HINT}: {details}", status.name)
    return RemoteError(_GRPC_CODE_NAMES.get(status, "internal_error"), details, status.name)


def _is_tls_failure(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("handshake", "certificate", "ssl_error", "tls"))


def _from_transport_error(e: httpx.TransportError) -> RemoteError:
    if isinstance(e, httpx.TimeoutException):
        return RemoteError("deadline_exceeded", str(e) or "no answer in time", 504)
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None or _is_tls_failure(str(e)):
        return RemoteError("tls_error", f"{_TLS_HINT}: {cause or e}", 503)
    return RemoteError("unavailable", str(e) or type(e).__name__, 503)


def grpc_channel(address: str, options: list[tuple[str, Any]], tls: bool = False,
                 ca_file: str | None = None) -> grpc.Channel:
    """A channel to HOST:PORT (an https:// prefix means TLS); with TLS the server's certificate is verified against
    `ca_file`, or the system's trusted CAs."""
    if address.startswith("https://"):
        address, tls = address.removeprefix("https://").rstrip("/"), True
    if not tls and ca_file is None:
        return grpc.insecure_channel(address, options=options)
    root = None if ca_file is None else Path(ca_file).read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


def http_verify(ca_file: str | None) -> ssl.SSLContext | bool:
    """httpx's `verify`: the system's trusted CAs, or a context trusting `ca_file` (hostnames are still checked)."""
    return True if ca_file is None else ssl.create_default_context(cafile=ca_file)


Metadata = tuple[tuple[str, str], ...]


def _with_affinity(metadata: Metadata, key: str | None) -> Metadata:
    return metadata if key is None else (*metadata, (AFFINITY_HEADER, key))


def _open_msg(prompt: list[int], params: SamplingParams, fingerprint: str, draft_name: str, client_id: str,
              session_id: str | None) -> pb.Open:
    msg = pb.Open(prompt=prompt, sampling=wire.params_to_pb(params), draft_fingerprint=fingerprint,
                  draft_name=draft_name, client_id=client_id)
    if session_id is not None:
        msg.session_id = session_id
    return msg


class GrpcVerifier:
    """`streaming=True`: one bidirectional stream per session; False: unary calls (OpenSession, Verify, ...)."""

    def __init__(
        self, address: str, *, streaming: bool = True, timeout_s: float = 30.0, stream_timeout_s: float = 3600.0,
        api_key: str | None = None, draft_fingerprint: str = "", draft_name: str = "", client_id: str = "",
        max_message_bytes: int = 4 * 1024 * 1024, tls: bool = False, tls_ca_file: str | None = None,
    ) -> None:
        self.channel = grpc_channel(address, [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ], tls, tls_ca_file)
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.streaming = streaming
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.draft_fingerprint = draft_fingerprint
        self.draft_name = draft_name
        self.client_id = client_id
        self.bytes_sent = self.bytes_received = 0  # of `generate` calls

    def open(
        self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
        affinity_key: str | None = None,
    ) -> GrpcStreamSession | GrpcUnarySession:
        msg = _open_msg(prompt, params, self.draft_fingerprint, self.draft_name, self.client_id, session_id)
        metadata = _with_affinity(self.metadata, affinity_key)
        if self.streaming:
            return GrpcStreamSession(self, msg, metadata)
        try:
            opened = self.stub.OpenSession(msg, timeout=self.timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None
        return GrpcUnarySession(self, opened, metadata)

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        """The target alone over the Generate stream; each step awaited at most `timeout_s`."""
        msg = _open_msg(prompt, params, "", self.draft_name, self.client_id, None)
        self.bytes_sent += msg.ByteSize()
        call = self.stub.Generate(msg, timeout=self.stream_timeout_s, metadata=self.metadata)
        try:
            while True:
                verdict = _next_with_deadline(call, call.cancel, self.timeout_s)
                if verdict is None:
                    return
                self.bytes_received += verdict.ByteSize()
                yield Step(list(verdict.tokens), wire.finish_from_pb(verdict.finish_reason))
        finally:
            call.cancel()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pipelined:
    """send/recv over unary calls: each block is one call on a small thread pool; answers are taken in order."""

    seq: int
    bytes_sent: int
    bytes_received: int

    def _call(self, block: DraftBlock, seq: int, base_len: int | None) -> Reply:
        raise NotImplementedError

    def _setup(self) -> None:
        self.seq = 0
        self.bytes_sent = self.bytes_received = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tandem-remote")
        self._pending: deque[Future[Reply]] = deque()

    def send(self, block: DraftBlock, base_len: int | None = None) -> None:
        self._pending.append(self._pool.submit(self._call, block, self.seq, base_len))
        self.seq += 1

    def recv(self) -> Reply:
        return self._pending.popleft().result()

    def verify(self, block: DraftBlock) -> VerifyResult:
        self.send(block)
        return self.recv().result

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrpcUnarySession(_Pipelined):
    def __init__(self, verifier: GrpcVerifier, opened: pb.Opened, metadata: Metadata | None = None) -> None:
        self.verifier = verifier
        self.opened = opened
        self.session_id = opened.session_id
        self.metadata = verifier.metadata if metadata is None else metadata
        self._setup()
        self.bytes_received = opened.ByteSize()

    def _call(self, block: DraftBlock, seq: int, base_len: int | None) -> Reply:
        v = self.verifier
        request = pb.VerifyRequest(session_id=self.session_id, draft=wire.block_to_pb(block, seq, base_len))
        self.bytes_sent += request.ByteSize()
        try:
            verdict = v.stub.Verify(request, timeout=v.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None
        self.bytes_received += verdict.ByteSize()
        return Reply(wire.result_from_pb(verdict), verdict.server_ms)

    def close(self) -> None:
        self._shutdown()
        v = self.verifier
        try:
            v.stub.CloseSession(pb.Close(session_id=self.session_id), timeout=v.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)):
                raise _from_rpc_error(e) from None


class GrpcStreamSession:
    """One Session stream. The stream has a deadline; each answer is also awaited at most `timeout_s`."""

    def __init__(self, verifier: GrpcVerifier, open_msg: pb.Open, metadata: Metadata | None = None) -> None:
        self.verifier = verifier
        self.seq = 0
        self.bytes_sent = open_msg.ByteSize()
        self.bytes_received = 0
        self._requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self._requests.put(pb.ClientMessage(open=open_msg))
        self._call = verifier.stub.Session(
            iter(self._requests.get, None), timeout=verifier.stream_timeout_s,
            metadata=verifier.metadata if metadata is None else metadata,
        )
        self._replies: Iterator[pb.ServerMessage] = self._call
        first = self._next()
        if first.WhichOneof("msg") != "opened":
            self._finish()
            raise self._error(first)
        self.opened = first.opened
        self.session_id = first.opened.session_id

    def _next(self) -> pb.ServerMessage:
        reply = _next_with_deadline(self._replies, self._call.cancel, self.verifier.timeout_s)
        if reply is None:
            raise RemoteError("unavailable", "the server ended the session stream", "OK")
        self.bytes_received += reply.ByteSize()
        return reply

    @staticmethod
    def _error(msg: pb.ServerMessage) -> RemoteError:
        if msg.WhichOneof("msg") == "error":
            return RemoteError(msg.error.code, msg.error.message, msg.error.grpc_status)
        return RemoteError("internal_error", f"unexpected message {msg.WhichOneof('msg')!r}", "UNKNOWN")

    def send(self, block: DraftBlock, base_len: int | None = None) -> None:
        msg = pb.ClientMessage(draft=wire.block_to_pb(block, self.seq, base_len))
        self.bytes_sent += msg.ByteSize()
        self._requests.put(msg)
        self.seq += 1

    def recv(self) -> Reply:
        reply = self._next()
        if reply.WhichOneof("msg") != "verdict":
            raise self._error(reply)
        return Reply(wire.result_from_pb(reply.verdict), reply.verdict.server_ms)

    def verify(self, block: DraftBlock) -> VerifyResult:
        self.send(block)
        return self.recv().result

    def _finish(self) -> None:
        self._requests.put(None)  # half-close: the server ends the stream and closes the session
        timer = threading.Timer(self.verifier.timeout_s, self._call.cancel)
        timer.start()
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass
        finally:
            timer.cancel()

    def close(self) -> None:
        self._requests.put(pb.ClientMessage(close=pb.Close()))
        self._finish()


class HttpVerifier:
    """The session API over HTTP: POST /v1/sessions, POST /v1/sessions/{id}/verify, DELETE /v1/sessions/{id}."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 30.0, api_key: str | None = None, draft_fingerprint: str = "",
        draft_name: str = "", client_id: str = "", tls_ca_file: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s,
                                   verify=http_verify(tls_ca_file))
        self.timeout_s = timeout_s
        self.draft_fingerprint = draft_fingerprint
        self.draft_name = draft_name
        self.client_id = client_id
        self.bytes_sent = self.bytes_received = 0  # of `generate` calls

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                count: Callable[[int, int], None] | None = None, affinity_key: str | None = None) -> dict[str, Any]:
        content = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        if affinity_key is not None:
            headers[AFFINITY_HEADER] = affinity_key
        try:
            r = self.client.request(method, path, content=content, headers=headers, timeout=self.timeout_s)
        except httpx.TransportError as e:
            raise _from_transport_error(e) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "internal_error", r.text[:200]
            raise RemoteError(code, message, r.status_code)
        if count is not None:
            count(len(content or b""), len(r.content))
        return r.json()

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        """The target alone: the cloud's /v1/completions SSE stream, token ids included (`return_token_ids`)."""
        model = self.request("GET", "/v1/models")["data"][0]["id"]
        body = {"model": model, "prompt": list(prompt), "max_tokens": params.max_tokens, "stream": True,
                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
                "ignore_eos": params.ignore_eos, "return_token_ids": True}
        if params.stop_token_ids:
            raise RemoteError("invalid_request", "stop_token_ids are not supported in cloud mode over HTTP", 400)
        self.bytes_sent += len(json.dumps(body))
        try:
            with self.client.stream("POST", "/v1/completions", json=body, timeout=self.timeout_s) as r:
                if r.status_code >= 400:
                    r.read()
                    err = r.json().get("error", {})
                    raise RemoteError(str(err.get("code", "internal_error")), str(err.get("message", "")),
                                      r.status_code)
                for line in r.iter_lines():
                    self.bytes_received += len(line) + 1
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]
                        raise RemoteError(str(err.get("code")), str(err.get("message")), 200)
                    choice = event["choices"][0]
                    yield Step(list(choice.get("token_ids") or []), choice.get("finish_reason"))
        except httpx.TransportError as e:
            raise _from_transport_error(e) from None

    def open(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
             affinity_key: str | None = None) -> HttpSession:
        sampling = {
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "seed": params.seed, "stop_token_ids": list(params.stop_token_ids),
            "ignore_eos": params.ignore_eos,
        }
        body = {"prompt": list(prompt), "sampling": sampling, "draft_fingerprint": self.draft_fingerprint,
                "draft_name": self.draft_name, "client_id": self.client_id, "session_id": session_id}
        sizes: list[int] = []
        opened = self.request("POST", "/v1/sessions", body, lambda sent, received: sizes.extend((sent, received)),
                              affinity_key)
        session = HttpSession(self, opened, affinity_key)
        session.bytes_sent, session.bytes_received = sizes
        return session

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HttpVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpSession(_Pipelined):
    def __init__(self, verifier: HttpVerifier, opened: dict[str, Any], affinity_key: str | None = None) -> None:
        self.verifier = verifier
        self.opened = opened
        self.session_id: str = opened["session_id"]
        self.affinity_key = affinity_key
        self._setup()
        self._lock = threading.Lock()

    def _count(self, sent: int, received: int) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def _call(self, block: DraftBlock, seq: int, base_len: int | None) -> Reply:
        k, ids, probs = wire.block_to_sparse(block)
        body = {"seq": seq, "tokens": block.tokens, "q_k": k, "q_ids": ids, "q_probs": probs, "base_len": base_len}
        if block.candidates:  # only then: a server without multi-candidate verification refuses the field
            body["candidates"] = [{"parent": c.parent, "tokens": c.tokens} for c in block.candidates]
        v = self.verifier.request("POST", f"/v1/sessions/{self.session_id}/verify", body, self._count,
                                  self.affinity_key)
        result = VerifyResult(v["num_accepted"], v["next_token"], v["kind"], v["tokens"], v["finish_reason"],
                              v["target_tokens"], v.get("stale", False), v.get("candidate"),
                              v.get("candidate_target_tokens") or [])
        return Reply(result, float(v.get("server_ms", 0.0)))

    def close(self) -> None:
        self._shutdown()
        try:
            self.verifier.request("DELETE", f"/v1/sessions/{self.session_id}", affinity_key=self.affinity_key)
        except RemoteError as e:
            if e.code not in ("session_not_found", "unavailable"):
                raise


def _next_with_deadline(replies: Iterator[Any], cancel: Callable[[], Any], timeout_s: float) -> Any:
    """The next message of a gRPC stream, or None at its end; the stream is cancelled if none comes in time."""
    timer = threading.Timer(timeout_s, cancel)
    timer.start()
    t0 = time.monotonic()
    try:
        return next(replies)
    except StopIteration:
        return None
    except grpc.RpcError as e:
        timed_out = not timer.is_alive() and time.monotonic() - t0 >= timeout_s
        if timed_out and isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.CANCELLED:
            raise RemoteError("deadline_exceeded", "no answer in time", "DEADLINE_EXCEEDED") from None
        raise _from_rpc_error(e) from None
    finally:
        timer.cancel()
