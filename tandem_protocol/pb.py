"""Conversions between the protobuf messages and the core's types, both directions. Protobuf types stop here.

Both ends use it: the cloud's servicer (messages in, worker calls, messages out) and the edge's gRPC verifier.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.blocks import DraftBlock, EdgeReport, FinishReason, TokenLogprob, VerifyResult
from tandem.grammar import Grammar
from tandem.messages import OpenRequest, SessionInfo
from tandem.sampling import SamplingParams
from tandem_protocol.flat import (
    block_to_sparse,
    candidates_from_flat,
    candidates_to_flat,
    feedback_from_flat,
    sparse_block,
)
from tandem_protocol.proto import verifier_pb2 as pb

_FINISH_TO_PB: dict[FinishReason | None, pb.FinishReason] = {
    None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
}
_FINISH_FROM_PB: dict[int, FinishReason | None] = {v: k for k, v in _FINISH_TO_PB.items()}


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        min_p=msg.min_p, presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        grammar=Grammar(msg.grammar.kind, msg.grammar.spec) if msg.HasField("grammar") else None,  # type: ignore[arg-type]
        logprobs=msg.logprobs if msg.HasField("logprobs") else None, emitted=msg.emitted,
    )


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, min_p=params.min_p,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias), emitted=params.emitted,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.repetition_penalty != 1.0:
        msg.repetition_penalty = params.repetition_penalty
    if params.grammar is not None:
        msg.grammar.kind, msg.grammar.spec = params.grammar.kind, params.grammar.spec
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprobs_to_pb(logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token=lp.token, logprob=lp.logprob, top_ids=[i for i, _ in lp.top],
                            top_logprobs=[v for _, v in lp.top]) for lp in logprobs or []]


def logprobs_from_pb(items: Sequence[pb.TokenLogprob]) -> list[TokenLogprob] | None:
    """None when none came (not asked for, or no token emitted)."""
    if not items:
        return None
    return [TokenLogprob(m.token, m.logprob, tuple(zip(m.top_ids, m.top_logprobs, strict=True))) for m in items]


def open_from_pb(msg: pb.Open) -> OpenRequest:
    return OpenRequest(
        prompt=list(msg.prompt), params=params_from_pb(msg.sampling), draft_fingerprint=msg.draft_fingerprint,
        draft_name=msg.draft_name, client_id=msg.client_id,
        session_id=msg.session_id if msg.HasField("session_id") else None,
        report=report_from_pb(msg.report) if msg.HasField("report") else None,
    )


def open_to_pb(req: OpenRequest) -> pb.Open:
    msg = pb.Open(prompt=req.prompt, sampling=params_to_pb(req.params), draft_fingerprint=req.draft_fingerprint,
                  draft_name=req.draft_name, client_id=req.client_id)
    if req.session_id is not None:
        msg.session_id = req.session_id
    if req.report is not None:
        msg.report.CopyFrom(report_to_pb(req.report))
    return msg


def report_to_pb(r: EdgeReport) -> pb.EdgeReport:
    return pb.EdgeReport(draft_ms=r.draft_ms, rtt_ms=r.rtt_ms, limit=r.limit, pipelined=r.pipelined)


def report_from_pb(msg: pb.EdgeReport) -> EdgeReport | None:
    """None for a limit of 0: no advice wanted."""
    return EdgeReport(msg.draft_ms, msg.rtt_ms, msg.limit, msg.pipelined) if msg.limit else None


def continue_to_pb(session_id: str, context: list[int]) -> pb.Open:
    """Generate's request to go on with an open session by the target alone."""
    return pb.Open(prompt=context, session_id=session_id, continue_session=True)


def opened_from_pb(msg: pb.Opened) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id, target_name=msg.target_name, target_fingerprint=msg.target_fingerprint,
        vocab_size=msg.vocab_size, context_length=msg.context_length, prompt_tokens=msg.prompt_tokens,
        max_draft_tokens=msg.max_draft_tokens, resumed=msg.resumed, eos_token_ids=tuple(msg.eos_token_ids),
        server_ms=msg.server_ms, advice=msg.advised_gamma if msg.HasField("advised_gamma") else None,
    )


def opened_to_pb(info: SessionInfo) -> pb.Opened:
    msg = pb.Opened(
        session_id=info.session_id, target_name=info.target_name, target_fingerprint=info.target_fingerprint,
        vocab_size=info.vocab_size, context_length=info.context_length, prompt_tokens=info.prompt_tokens,
        max_draft_tokens=info.max_draft_tokens, resumed=info.resumed, eos_token_ids=list(info.eos_token_ids),
        server_ms=info.server_ms,
    )
    if info.advice is not None:
        msg.advised_gamma = info.advice
    return msg


def block_from_pb(msg: pb.Draft) -> DraftBlock:
    block = sparse_block(list(msg.tokens), msg.q_k, list(msg.q_ids), list(msg.q_probs))
    block.candidates = candidates_from_flat(list(msg.candidate_parents), list(msg.candidate_lengths),
                                            list(msg.candidate_tokens))
    if msg.HasField("report"):
        block.report = report_from_pb(msg.report)
    return block


def base_len_from_pb(msg: pb.Draft) -> int | None:
    return msg.base_len if msg.HasField("base_len") else None


def block_to_pb(block: DraftBlock, seq: int, base_len: int | None = None) -> pb.Draft:
    k, ids, probs = block_to_sparse(block)
    parents, lengths, cand_tokens = candidates_to_flat(block)
    msg = pb.Draft(seq=seq, tokens=block.tokens, q_k=k, q_ids=ids, q_probs=probs, candidate_parents=parents,
                   candidate_lengths=lengths, candidate_tokens=cand_tokens)
    if base_len is not None:
        msg.base_len = base_len
    if block.report is not None:
        msg.report.CopyFrom(report_to_pb(block.report))
    return msg


def verdict_to_pb(r: VerifyResult) -> pb.Verdict:
    msg = pb.Verdict(
        seq=r.seq, num_accepted=r.num_accepted, tokens=r.tokens, finish_reason=_FINISH_TO_PB[r.finish_reason],
        target_tokens=r.target_tokens, generated=r.generated, stale=r.stale, server_ms=r.server_ms,
        queue_ms=r.queue_ms, candidate_target_lengths=[len(c) for c in r.candidate_target_tokens],
        candidate_target_tokens=[t for c in r.candidate_target_tokens for t in c], logprobs=logprobs_to_pb(r.logprobs),
    )
    if r.candidate is not None:
        msg.candidate = r.candidate
    if r.advice is not None:
        msg.advised_gamma = r.advice
    return msg


def finish_to_pb(reason: FinishReason | None) -> pb.FinishReason:
    return _FINISH_TO_PB[reason]


def finish_from_pb(value: int) -> FinishReason | None:
    return _FINISH_FROM_PB.get(value)


def verdict_from_pb(msg: pb.Verdict) -> VerifyResult:
    return VerifyResult(
        num_accepted=msg.num_accepted, tokens=list(msg.tokens), finish_reason=_FINISH_FROM_PB.get(msg.finish_reason),
        target_tokens=list(msg.target_tokens), stale=msg.stale,
        candidate=msg.candidate if msg.HasField("candidate") else None,
        candidate_target_tokens=feedback_from_flat(list(msg.candidate_target_lengths),
                                                   list(msg.candidate_target_tokens)),
        logprobs=logprobs_from_pb(msg.logprobs), seq=msg.seq, generated=msg.generated, server_ms=msg.server_ms,
        queue_ms=msg.queue_ms, advice=msg.advised_gamma if msg.HasField("advised_gamma") else None,
    )
