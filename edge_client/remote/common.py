"""What the gRPC and HTTP verifiers share: the affinity header, TLS failure detection, pipelined unary calls."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from tandem.blocks import DraftBlock, VerifyResult
from tandem.errors import RemoteError

AFFINITY_HEADER = "x-tandem-session"  # HTTP header and gRPC metadata key (lowercase, as gRPC requires)


def cancelled_error() -> RemoteError:
    """The edge's own request was cancelled (its client left): a code the loop does not retry."""
    return RemoteError("cancelled", "the request was cancelled", "CANCELLED")


TLS_HINT = "TLS: the cloud's certificate was not accepted (is it signed by tls_ca_file's CA, for this host?)"


def is_tls_failure(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("handshake", "certificate", "ssl_error", "tls"))


class Pipelined:
    """send/recv over unary calls: each block is one call on a small thread pool; answers are taken in order."""

    seq: int
    bytes_sent: int
    bytes_received: int

    def _call(self, block: DraftBlock, seq: int, base_len: int | None) -> VerifyResult:
        raise NotImplementedError

    def _setup(self) -> None:
        self.seq = 0
        self.bytes_sent = self.bytes_received = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tandem-remote")
        self._pending: deque[Future[VerifyResult]] = deque()

    def send(self, block: DraftBlock, base_len: int | None = None) -> None:
        self._pending.append(self._pool.submit(self._call, block, self.seq, base_len))
        self.seq += 1

    def recv(self) -> VerifyResult:
        return self._pending.popleft().result()

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


