"""The target in this process, behind the same session protocol as the remote verifiers (`tandem.messages`).

`send` queues a block and `recv` verifies the oldest: the speculative loop runs unchanged, without a network, so
in-process runs and tests measure the code the edge ships.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import deque
from collections.abc import Iterator

from tandem.blocks import DraftBlock, EdgeReport, VerifyResult
from tandem.errors import InvalidRequestError
from tandem.messages import SessionInfo, Step
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import TargetSession

MAX_DRAFT_TOKENS = 64  # what an in-process session accepts per block, as a server's max_draft_tokens


class LocalSession:
    def __init__(self, target: LoadedModel, prompt: list[int], params: SamplingParams,
                 session_id: str | None = None) -> None:
        self.core = TargetSession(target, prompt, params)  # the prompt is fed with the first block: no prefill pass
        self.session_id = session_id or uuid.uuid4().hex
        self.opened = SessionInfo(
            self.session_id, target.name, target.fingerprint, target.vocab_size, target.context_length, len(prompt),
            MAX_DRAFT_TOKENS, session_id is not None, target.eos_token_ids,
        )
        self.bytes_sent = self.bytes_received = 0
        self.seq = 0
        self._queue: deque[tuple[int, DraftBlock, int | None]] = deque()

    def send(self, block: DraftBlock, base_len: int | None = None) -> None:
        self._queue.append((self.seq, block, base_len))
        self.seq += 1

    def recv(self) -> VerifyResult:
        seq, block, base_len = self._queue.popleft()
        t0 = time.perf_counter()
        result = self.core.verify(block, base_len)
        return dataclasses.replace(result, seq=seq, generated=self.core.generated,
                                   server_ms=(time.perf_counter() - t0) * 1e3)

    def continue_alone(self, context: list[int]) -> Iterator[Step]:
        if context != self.core.state.tokens:
            raise InvalidRequestError("the context is not the session's committed one")
        while self.core.finish_reason is None:
            result = self.core.verify(DraftBlock([]))
            yield Step(result.tokens, result.finish_reason, result.logprobs)

    def close(self) -> None:
        self._queue.clear()
        self.core.close()


class LocalVerifier:
    """The target model in this process."""

    def __init__(self, target: LoadedModel) -> None:
        self.target = target
        self.bytes_sent = self.bytes_received = 0

    def open(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
             affinity_key: str | None = None, report: EdgeReport | None = None) -> LocalSession:
        return LocalSession(self.target, prompt, params, session_id)

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        session = TargetSession(self.target, prompt, params)
        try:
            while session.finish_reason is None:
                result = session.verify(DraftBlock([]))  # a zero-length block: the target's own next token
                yield Step(result.tokens, result.finish_reason, result.logprobs)
        finally:
            session.close()

    def close(self) -> None:
        pass
