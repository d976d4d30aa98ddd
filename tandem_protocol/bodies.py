"""The verification session as JSON (the proto's semantics): request and response bodies, and their conversions to
and from the core's types, both directions. The cloud's routes and the edge's HTTP verifier both use them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tandem.blocks import Candidate, DraftBlock, EdgeReport, TokenLogprob, VerifyResult
from tandem.grammar import Grammar, GrammarKind
from tandem.messages import OpenRequest, SessionInfo
from tandem.sampling import MIN_REPETITION_PENALTY, SamplingParams
from tandem_protocol.flat import block_to_sparse, sparse_block


def _integer(value: object) -> object:
    """JSON's integers (3.0 among them, as JSON Schema has it); never true, false or a string."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("must be an integer")
    return value


# request fields take exactly what their schema says: no bool for a number, no string for either
JSON_INT = BeforeValidator(_integer)  # after any Field(...): the schema then keeps its bounds
Int = Annotated[int, JSON_INT]
Float = Annotated[float, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]
TokenId = Annotated[int, Field(ge=0, lt=2**31), JSON_INT]


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int, Field(ge=1), JSON_INT] = 64
    temperature: Annotated[Float, Field(ge=0)] = 0.0
    top_k: Annotated[int, Field(ge=0, lt=2**31), JSON_INT] = 0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**64), JSON_INT] | None = None
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    ignore_eos: Flag = False
    # see the proto's SamplingParams
    min_p: Annotated[Float, Field(ge=0, le=1)] = 0.0
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[Float, Field(ge=MIN_REPETITION_PENALTY, le=10)] = 1.0
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[Float, Field(ge=-100, le=100)]] \
        = Field(default_factory=dict)
    grammar: GrammarBody | None = None
    logprobs: Annotated[int, Field(ge=0, le=20), JSON_INT] | None = None
    emitted: Annotated[int, Field(ge=0), JSON_INT] = 0


class GrammarBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: GrammarKind
    spec: str = ""


class TokenLogprobBody(BaseModel):
    """The target's log-probability of an emitted token; `top`: [token id, log-probability] pairs, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)


class EdgeReportBody(BaseModel):
    """See the proto's EdgeReport; limit 0: no advice wanted."""

    draft_ms: Annotated[Float, Field(ge=0)] = 0.0
    rtt_ms: Annotated[Float, Field(ge=0)] = 0.0
    limit: Annotated[int, Field(ge=0), JSON_INT] = 0
    pipelined: Flag = False  # JSON's true or false, never 0 or "yes"

    @classmethod
    def of(cls, r: EdgeReport) -> EdgeReportBody:
        return cls(draft_ms=r.draft_ms, rtt_ms=r.rtt_ms, limit=r.limit, pipelined=r.pipelined)

    def core(self) -> EdgeReport | None:
        return EdgeReport(self.draft_ms, self.rtt_ms, self.limit, self.pipelined) if self.limit else None


class OpenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[list[TokenId], Field(min_length=1)]
    sampling: SamplingBody = Field(default_factory=SamplingBody)
    draft_fingerprint: str = ""
    draft_name: str = ""
    client_id: str = ""
    session_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    report: EdgeReportBody | None = None  # for an advice on the first block: see the proto's Open.report


class ContinueBody(BaseModel):
    """Go on with an open session as a stream of the target alone (`POST /v1/sessions/{id}/continue`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[list[TokenId], Field(min_length=1)]  # the session's committed context: prompt + output so far


class StepBody(BaseModel):
    """One event of that stream (SSE `data:`): the tokens of one target step."""

    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None
    generated: int
    logprobs: list[TokenLogprobBody] | None = None  # when the session's sampling asked for them


class OpenedBody(BaseModel):
    session_id: str
    target_name: str
    target_fingerprint: str
    vocab_size: int
    context_length: int
    prompt_tokens: int
    max_draft_tokens: int
    resumed: bool
    eos_token_ids: list[int]
    server_ms: float = 0.0
    advised_gamma: int | None = None  # as in VerdictBody, for the first block


class CandidateBody(BaseModel):
    """A continuation verified beside the draft (greedy only): it follows tokens[parent] (-1: the context)."""

    model_config = ConfigDict(extra="forbid")

    parent: Annotated[int, Field(ge=-1), JSON_INT]
    tokens: list[TokenId]


class DraftBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: Annotated[int, Field(ge=0), JSON_INT]
    tokens: list[TokenId] = Field(default_factory=list)
    q_k: Annotated[int, Field(ge=0), JSON_INT] = 0
    q_ids: list[TokenId] = Field(default_factory=list)
    q_probs: list[Float] = Field(default_factory=list)
    base_len: Annotated[int, Field(ge=0), JSON_INT] | None = None  # pipelined rounds: see the proto's Draft.base_len
    candidates: list[CandidateBody] = Field(default_factory=list)  # see the proto's Draft.candidate_parents
    report: EdgeReportBody | None = None  # for the cloud's load-aware advice: see the proto's Draft.report


class VerdictBody(BaseModel):
    seq: int
    num_accepted: int
    tokens: list[int]
    finish_reason: Literal["stop", "length"] | None
    target_tokens: list[int]
    generated: int
    stale: bool = False
    server_ms: float = 0.0
    queue_ms: float = 0.0  # of server_ms: waiting for the model thread (batching), not computing
    candidate: int | None = None  # the index of the draft's candidate on the accepted path
    candidate_target_tokens: list[list[int]] = Field(default_factory=list)  # per candidate: the target's argmax
    advised_gamma: int | None = None  # the block length the cloud advises next (0: continue as its stream)
    logprobs: list[TokenLogprobBody] | None = None  # one per emitted token, when the session asked for them


class ClosedBody(BaseModel):
    session_id: str
    closed: bool = True


# --- conversions: the cloud reads requests and writes answers; the edge writes requests and reads answers


def params_to_body(params: SamplingParams) -> SamplingBody:
    g = params.grammar
    return SamplingBody(max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                        top_p=params.top_p, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
                        ignore_eos=params.ignore_eos, min_p=params.min_p, presence_penalty=params.presence_penalty,
                        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                        logit_bias={str(t): b for t, b in params.logit_bias},
                        grammar=None if g is None else GrammarBody(kind=g.kind, spec=g.spec),
                        logprobs=params.logprobs, emitted=params.emitted)


def params_from_body(s: SamplingBody) -> SamplingParams:
    return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          seed=s.seed, stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
                          min_p=s.min_p, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                          repetition_penalty=s.repetition_penalty,
                          logit_bias=tuple(sorted((int(t), b) for t, b in s.logit_bias.items())),
                          grammar=None if s.grammar is None else Grammar(s.grammar.kind, s.grammar.spec),
                          logprobs=s.logprobs, emitted=s.emitted)


def logprobs_to_body(logprobs: list[TokenLogprob] | None) -> list[TokenLogprobBody] | None:
    if logprobs is None:
        return None
    return [TokenLogprobBody(token=lp.token, logprob=lp.logprob, top=list(lp.top)) for lp in logprobs]


def logprobs_from_body(items: list[TokenLogprobBody] | None) -> list[TokenLogprob] | None:
    if items is None:
        return None
    return [TokenLogprob(b.token, b.logprob, tuple((int(i), float(v)) for i, v in b.top)) for b in items]


def open_to_json(req: OpenRequest) -> dict[str, Any]:
    body = OpenBody(prompt=req.prompt, sampling=params_to_body(req.params), draft_fingerprint=req.draft_fingerprint,
                    draft_name=req.draft_name, client_id=req.client_id, session_id=req.session_id,
                    report=None if req.report is None else EdgeReportBody.of(req.report))
    return body.model_dump(mode="json", exclude=set() if req.report else {"report"})


def open_from_body(body: OpenBody) -> OpenRequest:
    return OpenRequest(body.prompt, params_from_body(body.sampling), body.draft_fingerprint, body.draft_name,
                       body.client_id, body.session_id, None if body.report is None else body.report.core())


def opened_to_body(info: SessionInfo) -> OpenedBody:
    return OpenedBody(
        session_id=info.session_id, target_name=info.target_name, target_fingerprint=info.target_fingerprint,
        vocab_size=info.vocab_size, context_length=info.context_length, prompt_tokens=info.prompt_tokens,
        max_draft_tokens=info.max_draft_tokens, resumed=info.resumed, eos_token_ids=list(info.eos_token_ids),
        server_ms=info.server_ms, advised_gamma=info.advice,
    )


def opened_from_json(obj: dict[str, Any]) -> SessionInfo:
    b = OpenedBody.model_validate(obj)
    return SessionInfo(b.session_id, b.target_name, b.target_fingerprint, b.vocab_size, b.context_length,
                       b.prompt_tokens, b.max_draft_tokens, b.resumed, tuple(b.eos_token_ids), b.server_ms,
                       b.advised_gamma)


def draft_to_json(block: DraftBlock, seq: int, base_len: int | None) -> dict[str, Any]:
    k, ids, probs = block_to_sparse(block)
    body: dict[str, Any] = {"seq": seq, "tokens": block.tokens, "q_k": k, "q_ids": ids, "q_probs": probs,
                            "base_len": base_len}
    if block.candidates:  # only then: a server without multi-candidate verification refuses the field
        body["candidates"] = [{"parent": c.parent, "tokens": c.tokens} for c in block.candidates]
    if block.report is not None:  # likewise: only when advice is wanted
        body["report"] = EdgeReportBody.of(block.report).model_dump(mode="json")
    return body


def draft_from_body(body: DraftBody) -> DraftBlock:
    block = sparse_block(body.tokens, body.q_k, body.q_ids, body.q_probs)
    block.candidates = [Candidate(c.parent, c.tokens) for c in body.candidates]
    block.report = None if body.report is None else body.report.core()
    return block


def verdict_to_body(r: VerifyResult) -> VerdictBody:
    return VerdictBody(
        seq=r.seq, num_accepted=r.num_accepted, tokens=r.tokens, finish_reason=r.finish_reason,
        target_tokens=r.target_tokens, generated=r.generated, stale=r.stale, server_ms=r.server_ms,
        queue_ms=r.queue_ms, candidate=r.candidate, candidate_target_tokens=r.candidate_target_tokens,
        advised_gamma=r.advice, logprobs=logprobs_to_body(r.logprobs),
    )


def verdict_from_json(obj: dict[str, Any]) -> VerifyResult:
    b = VerdictBody.model_validate(obj)
    return VerifyResult(b.num_accepted, b.tokens, b.finish_reason, b.target_tokens, b.stale, b.candidate,
                        b.candidate_target_tokens, logprobs_from_body(b.logprobs), b.seq, b.generated, b.server_ms,
                        b.queue_ms, b.advised_gamma)
