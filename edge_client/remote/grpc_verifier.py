"""The cloud over gRPC: one bidirectional stream per session, or unary calls; the Generate stream (cloud-only)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from edge_client.remote.common import AFFINITY_HEADER, TLS_HINT, Pipelined, cancelled_error, is_tls_failure
from edge_client.remote.watchdog import WATCHDOG
from tandem.blocks import DraftBlock, EdgeReport, VerifyResult
from tandem.errors import RemoteError
from tandem.messages import OpenRequest, Step
from tandem.sampling import SamplingParams
from tandem_protocol import pb as wire
from tandem_protocol.errors import code_from_grpc
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc


def _from_rpc_error(e: grpc.RpcError, aborted: bool = False) -> RemoteError:
    status = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    if aborted and status == grpc.StatusCode.CANCELLED:
        return cancelled_error()  # not retried
    if status == grpc.StatusCode.UNAVAILABLE and is_tls_failure(details):
        # not retried: a certificate the edge refuses stays refused
        return RemoteError("tls_error", f"{TLS_HINT}: {details}", status.name)
    return RemoteError(code_from_grpc(status), details, status.name)


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


Metadata = tuple[tuple[str, str], ...]


def _with_affinity(metadata: Metadata, key: str | None) -> Metadata:
    return metadata if key is None else (*metadata, (AFFINITY_HEADER, key))




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
            # Trap: channels to one address share a process-wide subchannel, and with it the reconnect backoff a
            # failed handshake left behind (1 s, 1.6 s, 2.6 s, ...): a reconnect after a blackholed link would wait
            # it out and time out again. Each verifier (one per attempt) gets its own connection instead.
            ("grpc.use_local_subchannel_pool", 1),
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
        self.aborted = False
        self._calls: set[Any] = set()  # in flight: what `abort` cancels
        self._lock = threading.Lock()

    def abort(self) -> None:
        """From any thread: cancel every call in flight (a Session stream's end closes its session on the cloud);
        later calls fail at once with `cancelled`, except closing a session, which still goes through."""
        with self._lock:
            self.aborted = True
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def track(self, call: Any) -> None:
        with self._lock:
            if self.aborted:
                call.cancel()
            self._calls.add(call)

    def untrack(self, call: Any) -> None:
        with self._lock:
            self._calls.discard(call)

    def unary(self, method: Any, request: Any, metadata: Metadata, closing: bool = False) -> Any:
        """A unary call, cancellable by `abort`."""
        if self.aborted and not closing:
            raise cancelled_error()
        future = method.future(request, timeout=self.timeout_s, metadata=metadata)
        if not closing:
            self.track(future)
        try:
            return future.result()
        except grpc.RpcError as e:
            raise _from_rpc_error(e, self.aborted) from None
        finally:
            self.untrack(future)

    def open(
        self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
        affinity_key: str | None = None, report: EdgeReport | None = None,
    ) -> GrpcStreamSession | GrpcUnarySession:
        msg = wire.open_to_pb(OpenRequest(prompt, params, self.draft_fingerprint, self.draft_name, self.client_id,
                                          session_id, report))
        metadata = _with_affinity(self.metadata, affinity_key)
        if self.streaming:
            return GrpcStreamSession(self, msg, metadata)
        return GrpcUnarySession(self, self.unary(self.stub.OpenSession, msg, metadata), metadata)

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        """The target alone over the Generate stream; each step awaited at most `timeout_s`."""
        msg = wire.open_to_pb(OpenRequest(prompt, params, "", self.draft_name, self.client_id))
        return self.steps(msg, self.metadata)

    def steps(self, msg: pb.Open, metadata: Metadata) -> Iterator[Step]:
        """A Generate stream's steps."""
        self.bytes_sent += msg.ByteSize()
        call = self.stub.Generate(msg, timeout=self.stream_timeout_s, metadata=metadata)
        self.track(call)
        try:
            while True:
                verdict = _next_with_deadline(call, call.cancel, self.timeout_s, self)
                if verdict is None:
                    return
                self.bytes_received += verdict.ByteSize()
                yield Step(list(verdict.tokens), wire.finish_from_pb(verdict.finish_reason),
                           wire.logprobs_from_pb(verdict.logprobs))
        finally:
            call.cancel()
            self.untrack(call)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GrpcUnarySession(Pipelined):
    def __init__(self, verifier: GrpcVerifier, opened: pb.Opened, metadata: Metadata | None = None) -> None:
        self.verifier = verifier
        self.opened = wire.opened_from_pb(opened)
        self.session_id = opened.session_id
        self.metadata = verifier.metadata if metadata is None else metadata
        self._setup()
        self.bytes_received = opened.ByteSize()

    def _call(self, block: DraftBlock, seq: int, base_len: int | None) -> VerifyResult:
        v = self.verifier
        request = pb.VerifyRequest(session_id=self.session_id, draft=wire.block_to_pb(block, seq, base_len))
        self.bytes_sent += request.ByteSize()
        verdict = v.unary(v.stub.Verify, request, self.metadata)
        self.bytes_received += verdict.ByteSize()
        return wire.verdict_from_pb(verdict)

    def continue_alone(self, context: list[int]) -> Iterator[Step]:
        return self.verifier.steps(wire.continue_to_pb(self.session_id, context), self.metadata)

    def close(self) -> None:
        self._shutdown()
        v = self.verifier
        try:
            v.unary(v.stub.CloseSession, pb.Close(session_id=self.session_id), self.metadata, closing=True)
        except RemoteError as e:
            if e.status not in ("NOT_FOUND", "UNAVAILABLE"):
                raise


class GrpcStreamSession:
    """One Session stream. The stream has a deadline; each answer is also awaited at most `timeout_s`."""

    def __init__(self, verifier: GrpcVerifier, open_msg: pb.Open, metadata: Metadata | None = None) -> None:
        self.verifier = verifier
        self.seq = 0
        self.bytes_sent = open_msg.ByteSize()
        self.bytes_received = 0
        self._requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self._requests.put(pb.ClientMessage(open=open_msg))
        self.metadata = verifier.metadata if metadata is None else metadata
        self._call = verifier.stub.Session(
            iter(self._requests.get, None), timeout=verifier.stream_timeout_s, metadata=self.metadata,
        )
        verifier.track(self._call)
        self._replies: Iterator[pb.ServerMessage] = self._call
        first = self._next()
        if first.WhichOneof("msg") != "opened":
            self._finish()
            raise self._error(first)
        self.opened = wire.opened_from_pb(first.opened)
        self.session_id = first.opened.session_id

    def _next(self) -> pb.ServerMessage:
        reply = _next_with_deadline(self._replies, self._call.cancel, self.verifier.timeout_s, self.verifier)
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

    def recv(self) -> VerifyResult:
        reply = self._next()
        if reply.WhichOneof("msg") != "verdict":
            raise self._error(reply)
        return wire.verdict_from_pb(reply.verdict)

    def continue_alone(self, context: list[int]) -> Iterator[Step]:
        """On a Generate stream of its own; this stream, closed after, then finds its session gone (as it should)."""
        return self.verifier.steps(wire.continue_to_pb(self.session_id, context), self.metadata)

    def _finish(self) -> None:
        self._requests.put(None)  # half-close: the server ends the stream and closes the session
        timer = WATCHDOG.arm(self.verifier.timeout_s, self._call.cancel)
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass
        finally:
            WATCHDOG.disarm(timer)
            self.verifier.untrack(self._call)

    def close(self) -> None:
        self._requests.put(pb.ClientMessage(close=pb.Close()))
        self._finish()


def _next_with_deadline(replies: Iterator[Any], cancel: Callable[[], Any], timeout_s: float,
                        verifier: GrpcVerifier | None = None) -> Any:
    """The next message of a gRPC stream, or None at its end; the stream is cancelled if none comes in time."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()  # before cancelling: the cancelled call may raise while this thread is still running
        cancel()

    timer = WATCHDOG.arm(timeout_s, expire)
    try:
        return next(replies)
    except StopIteration:
        return None
    except grpc.RpcError as e:
        if expired.is_set() and isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.CANCELLED:
            raise RemoteError("deadline_exceeded", "no answer in time", "DEADLINE_EXCEEDED") from None
        raise _from_rpc_error(e, verifier is not None and verifier.aborted) from None
    finally:
        WATCHDOG.disarm(timer)
