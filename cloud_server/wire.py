"""Conversions between the protobuf messages and the engine's types. Protobuf types stop here.

Both ends use it: the server (messages in, engine calls, messages out) and the edge's remote verifiers.
"""

from __future__ import annotations

import torch

from cloud_server.proto import verifier_pb2 as pb
from cloud_server.worker import OpenRequest, SessionInfo, SessionVerdict
from tandem.engine import Candidate, DraftBlock, FinishReason, VerifyResult
from tandem.errors import InvalidRequestError
from tandem.sampling import SamplingParams
from tandem.verify import TokenKind

_KIND_TO_PB = {"recovered": pb.TOKEN_KIND_RECOVERED, "bonus": pb.TOKEN_KIND_BONUS}
_KIND_FROM_PB: dict[int, TokenKind] = {pb.TOKEN_KIND_RECOVERED: "recovered", pb.TOKEN_KIND_BONUS: "bonus"}
_FINISH_TO_PB = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
_FINISH_FROM_PB: dict[int, FinishReason | None] = {v: k for k, v in _FINISH_TO_PB.items()}


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
    )


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def open_from_pb(msg: pb.Open) -> OpenRequest:
    return OpenRequest(
        prompt=list(msg.prompt), params=params_from_pb(msg.sampling), draft_fingerprint=msg.draft_fingerprint,
        draft_name=msg.draft_name, client_id=msg.client_id,
        session_id=msg.session_id if msg.HasField("session_id") else None,
    )


def opened_to_pb(info: SessionInfo) -> pb.Opened:
    return pb.Opened(
        session_id=info.session_id, target_name=info.target_name, target_fingerprint=info.target_fingerprint,
        vocab_size=info.vocab_size, context_length=info.context_length, prompt_tokens=info.prompt_tokens,
        max_draft_tokens=info.max_draft_tokens, resumed=info.resumed, eos_token_ids=list(info.eos_token_ids),
        server_ms=info.server_ms,
    )


def sparse_block(tokens: list[int], q_k: int, q_ids: list[int], q_probs: list[float]) -> DraftBlock:
    """A DraftBlock from the flattened wire form of q: q_ids[i * q_k + j] for position i."""
    n = len(tokens)
    if q_k == 0:
        if q_ids or q_probs:
            raise InvalidRequestError("q_ids and q_probs need q_k > 0")
        return DraftBlock(list(tokens))
    if len(q_ids) != n * q_k or len(q_probs) != n * q_k:
        raise InvalidRequestError(f"q_ids and q_probs must each hold len(tokens) * q_k = {n * q_k} values")
    ids = torch.tensor(q_ids, dtype=torch.long).reshape(n, q_k)  # [gamma, k]
    probs = torch.tensor(q_probs, dtype=torch.float32).reshape(n, q_k)  # [gamma, k]
    return DraftBlock(list(tokens), q_ids=ids, q_probs=probs)


def block_to_sparse(block: DraftBlock) -> tuple[int, list[int], list[float]]:
    """(q_k, q_ids, q_probs) flattened; a dense q is sent whole, as k = V."""
    ids, probs = block.q_ids, block.q_probs
    if block.q_full is not None:
        probs = block.q_full  # [gamma, V]
        ids = torch.arange(probs.shape[-1]).expand(probs.shape[0], -1)
    if ids is None or probs is None or not block.tokens:
        return 0, [], []
    return int(ids.shape[-1]), ids.reshape(-1).tolist(), probs.float().reshape(-1).tolist()


def block_from_pb(msg: pb.Draft) -> DraftBlock:
    block = sparse_block(list(msg.tokens), msg.q_k, list(msg.q_ids), list(msg.q_probs))
    block.candidates = candidates_from_flat(list(msg.candidate_parents), list(msg.candidate_lengths),
                                            list(msg.candidate_tokens))
    return block


def candidates_from_flat(parents: list[int], lengths: list[int], tokens: list[int]) -> list[Candidate]:
    """Candidates from their flattened wire form (HTTP and gRPC alike)."""
    if len(parents) != len(lengths) or sum(lengths) != len(tokens):
        raise InvalidRequestError("candidate_parents and candidate_lengths must pair up, and candidate_tokens hold "
                                  "sum(candidate_lengths) ids")
    out, at = [], 0
    for parent, n in zip(parents, lengths, strict=True):
        out.append(Candidate(parent, list(tokens[at : at + n])))
        at += n
    return out


def candidates_to_flat(block: DraftBlock) -> tuple[list[int], list[int], list[int]]:
    """(parents, lengths, tokens) of a block's candidates."""
    c = block.candidates
    return [x.parent for x in c], [len(x.tokens) for x in c], [t for x in c for t in x.tokens]


def feedback_from_flat(lengths: list[int], tokens: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in lengths:
        out.append(list(tokens[at : at + n]))
        at += n
    return out


def base_len_from_pb(msg: pb.Draft) -> int | None:
    return msg.base_len if msg.HasField("base_len") else None


def block_to_pb(block: DraftBlock, seq: int, base_len: int | None = None) -> pb.Draft:
    k, ids, probs = block_to_sparse(block)
    parents, lengths, cand_tokens = candidates_to_flat(block)
    msg = pb.Draft(seq=seq, tokens=block.tokens, q_k=k, q_ids=ids, q_probs=probs, candidate_parents=parents,
                   candidate_lengths=lengths, candidate_tokens=cand_tokens)
    if base_len is not None:
        msg.base_len = base_len
    return msg


def verdict_to_pb(v: SessionVerdict) -> pb.Verdict:
    r = v.result
    msg = pb.Verdict(
        seq=v.seq, num_accepted=r.num_accepted, next_token=r.next_token, kind=_KIND_TO_PB[r.kind], tokens=r.tokens,
        finish_reason=_FINISH_TO_PB[r.finish_reason], target_tokens=r.target_tokens, generated=v.generated,
        stale=r.stale, server_ms=v.server_ms, candidate_target_lengths=[len(c) for c in r.candidate_target_tokens],
        candidate_target_tokens=[t for c in r.candidate_target_tokens for t in c],
    )
    if r.candidate is not None:
        msg.candidate = r.candidate
    return msg


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB[reason]


def finish_from_pb(value: int) -> FinishReason | None:
    return _FINISH_FROM_PB.get(value)


def result_from_pb(msg: pb.Verdict) -> VerifyResult:
    return VerifyResult(
        num_accepted=msg.num_accepted, next_token=msg.next_token, kind=_KIND_FROM_PB.get(msg.kind, "recovered"),
        tokens=list(msg.tokens), finish_reason=_FINISH_FROM_PB.get(msg.finish_reason),
        target_tokens=list(msg.target_tokens), stale=msg.stale,
        candidate=msg.candidate if msg.HasField("candidate") else None,
        candidate_target_tokens=feedback_from_flat(list(msg.candidate_target_lengths),
                                                   list(msg.candidate_target_tokens)),
    )
