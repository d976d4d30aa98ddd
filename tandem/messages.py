"""The verification session protocol in core types, and the verifier seam the speculative loop talks to.

A session: `open` (the context and sampling parameters; the target prefills) -> `SessionInfo`; then blocks, each sent
with its `seq` and, when drafted ahead, its `base_len` (`send`), answered in order (`recv` -> `VerifyResult`); then
`close`. A verifier also streams the target alone (`generate` -> `Step`s): the cloud-only baseline.

`tandem.local.LocalVerifier` implements it in this process; the edge's remote verifiers (gRPC, HTTP) over the wire,
converting with the protocol package. The loop cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from tandem.blocks import DraftBlock, EdgeReport, FinishReason, TokenLogprob, VerifyResult
from tandem.sampling import SamplingParams
from tandem.stats import RoundShape


@dataclass(frozen=True)
class OpenRequest:
    prompt: list[int]  # the full context: original prompt + tokens already emitted when resuming
    params: SamplingParams
    draft_fingerprint: str = ""
    draft_name: str = ""
    client_id: str = ""
    session_id: str | None = None  # resume under this id
    report: EdgeReport | None = None  # for an advice on the first block (load-aware speculation)


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    target_name: str
    target_fingerprint: str
    vocab_size: int
    context_length: int
    prompt_tokens: int
    max_draft_tokens: int
    resumed: bool
    eos_token_ids: tuple[int, ...]
    server_ms: float = 0.0
    advice: int | None = None  # the cloud's advice for the first block (0: continue as its stream at once)


@dataclass(frozen=True)
class Step:
    """One step of the target alone (or of the edge's generation, which says where its tokens came from)."""

    tokens: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the generation asked for them
    origins: str | None = None  # one code per token (`GenerationStats.origins`); None: the target's own
    shapes: tuple[RoundShape, ...] = ()  # the verified blocks these tokens end (`GenerationStats.shapes`)


class VerifierSession(Protocol):
    opened: SessionInfo
    session_id: str
    bytes_sent: int
    bytes_received: int

    def send(self, block: DraftBlock, base_len: int | None = None) -> None: ...

    def recv(self) -> VerifyResult: ...

    def continue_alone(self, context: list[int]) -> Iterator[Step]:
        """The session goes on as a stream of the target alone, from its cache, and ends with it. `context`: what it
        committed (prompt + output); no block may be in flight."""
        ...

    def close(self) -> None: ...


class Verifier(Protocol):
    bytes_sent: int  # of `generate` calls
    bytes_received: int

    def open(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
             affinity_key: str | None = None, report: EdgeReport | None = None) -> VerifierSession: ...

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]: ...

    def close(self) -> None: ...
