"""Remote verifiers: the cloud's target behind gRPC (streaming or unary) or HTTP, as `tandem.engine.Verifier`s.

Synchronous, like the generation loop that drives them. Every call carries a deadline. Failures raise `RemoteError`
with the server's error code (invalid_request, session_not_found, tokenizer_mismatch, over_capacity, ...) and the
transport status.

Resume after a cloud restart: open a new session with prompt = original prompt + tokens emitted so far and
max_tokens reduced by their number (optionally under the old `session_id`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx

from cloud_server import wire
from cloud_server.proto import verifier_pb2 as pb
from cloud_server.proto import verifier_pb2_grpc as pb_grpc
from tandem.engine import DraftBlock, VerifyResult
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


def _from_rpc_error(e: grpc.RpcError) -> RemoteError:
    status = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    return RemoteError(_GRPC_CODE_NAMES.get(status, "internal_error"), details, status.name)


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
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.streaming = streaming
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.draft_fingerprint = draft_fingerprint
        self.draft_name = draft_name
        self.client_id = client_id

    def open(
        self, prompt: list[int], params: SamplingParams, session_id: str | None = None
    ) -> GrpcStreamSession | GrpcUnarySession:
        msg = _open_msg(prompt, params, self.draft_fingerprint, self.draft_name, self.client_id, session_id)
        if self.streaming:
            return GrpcStreamSession(self, msg)
        try:
            opened = self.stub.OpenSession(msg, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None
        return GrpcUnarySession(self, opened)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GrpcUnarySession:
    def __init__(self, verifier: GrpcVerifier, opened: pb.Opened) -> None:
        self.verifier = verifier
        self.opened = opened
        self.session_id = opened.session_id
        self.seq = 0

    def verify(self, block: DraftBlock) -> VerifyResult:
        v = self.verifier
        request = pb.VerifyRequest(session_id=self.session_id, draft=wire.block_to_pb(block, self.seq))
        try:
            verdict = v.stub.Verify(request, timeout=v.timeout_s, metadata=v.metadata)
        except grpc.RpcError as e:
            raise _from_rpc_error(e) from None
        self.seq += 1
        return wire.result_from_pb(verdict)

    def close(self) -> None:
        v = self.verifier
        try:
            v.stub.CloseSession(pb.Close(session_id=self.session_id), timeout=v.timeout_s, metadata=v.metadata)
        except grpc.RpcError as e:
            if not (isinstance(e, grpc.Call) and e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)):
                raise _from_rpc_error(e) from None


class GrpcStreamSession:
    """One Session stream. The stream has a deadline; each answer is also awaited at most `timeout_s`."""

    def __init__(self, verifier: GrpcVerifier, open_msg: pb.Open) -> None:
        self.verifier = verifier
        self.seq = 0
        self._requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self._requests.put(pb.ClientMessage(open=open_msg))
        self._call = verifier.stub.Session(
            iter(self._requests.get, None), timeout=verifier.stream_timeout_s, metadata=verifier.metadata
        )
        self._replies: Iterator[pb.ServerMessage] = self._call
        first = self._next()
        if first.WhichOneof("msg") != "opened":
            self._finish()
            raise self._error(first)
        self.opened = first.opened
        self.session_id = first.opened.session_id

    def _next(self) -> pb.ServerMessage:
        timer = threading.Timer(self.verifier.timeout_s, self._call.cancel)  # a per-answer deadline
        timer.start()
        try:
            return next(self._replies)
        except StopIteration:
            raise RemoteError("unavailable", "the server ended the session stream", "OK") from None
        except grpc.RpcError as e:
            if not timer.is_alive() and isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.CANCELLED:
                raise RemoteError("deadline_exceeded", "no answer in time", "DEADLINE_EXCEEDED") from None
            raise _from_rpc_error(e) from None
        finally:
            timer.cancel()

    @staticmethod
    def _error(msg: pb.ServerMessage) -> RemoteError:
        if msg.WhichOneof("msg") == "error":
            return RemoteError(msg.error.code, msg.error.message, msg.error.grpc_status)
        return RemoteError("internal_error", f"unexpected message {msg.WhichOneof('msg')!r}", "UNKNOWN")

    def verify(self, block: DraftBlock) -> VerifyResult:
        self._requests.put(pb.ClientMessage(draft=wire.block_to_pb(block, self.seq)))
        reply = self._next()
        if reply.WhichOneof("msg") != "verdict":
            raise self._error(reply)
        self.seq += 1
        return wire.result_from_pb(reply.verdict)

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
        draft_name: str = "", client_id: str = "",
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        self.timeout_s = timeout_s
        self.draft_fingerprint = draft_fingerprint
        self.draft_name = draft_name
        self.client_id = client_id

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.client.request(method, path, json=body, timeout=self.timeout_s)
        except httpx.TimeoutException as e:
            raise RemoteError("deadline_exceeded", str(e) or "no answer in time", 504) from None
        except httpx.TransportError as e:
            raise RemoteError("unavailable", str(e) or type(e).__name__, 503) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "internal_error", r.text[:200]
            raise RemoteError(code, message, r.status_code)
        return r.json()

    def open(self, prompt: list[int], params: SamplingParams, session_id: str | None = None) -> HttpSession:
        sampling = {
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "seed": params.seed, "stop_token_ids": list(params.stop_token_ids),
            "ignore_eos": params.ignore_eos,
        }
        body = {"prompt": list(prompt), "sampling": sampling, "draft_fingerprint": self.draft_fingerprint,
                "draft_name": self.draft_name, "client_id": self.client_id, "session_id": session_id}
        return HttpSession(self, self.request("POST", "/v1/sessions", body))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HttpVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpSession:
    def __init__(self, verifier: HttpVerifier, opened: dict[str, Any]) -> None:
        self.verifier = verifier
        self.opened = opened
        self.session_id: str = opened["session_id"]
        self.seq = 0

    def verify(self, block: DraftBlock) -> VerifyResult:
        k, ids, probs = wire.block_to_sparse(block)
        body = {"seq": self.seq, "tokens": block.tokens, "q_k": k, "q_ids": ids, "q_probs": probs}
        v = self.verifier.request("POST", f"/v1/sessions/{self.session_id}/verify", body)
        self.seq += 1
        return VerifyResult(v["num_accepted"], v["next_token"], v["kind"], v["tokens"], v["finish_reason"],
                            v["target_tokens"])

    def close(self) -> None:
        try:
            self.verifier.request("DELETE", f"/v1/sessions/{self.session_id}")
        except RemoteError as e:
            if e.code not in ("session_not_found", "unavailable"):
                raise
