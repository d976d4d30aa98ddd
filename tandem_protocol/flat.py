"""The flat wire forms of a block's q and candidates, shared by the protobuf and JSON conversions."""

from __future__ import annotations

import torch

from tandem.blocks import Candidate, DraftBlock
from tandem.errors import InvalidRequestError


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
    """(q_k, q_ids, q_probs) flattened."""
    ids, probs = block.q_ids, block.q_probs
    if ids is None or probs is None or not block.tokens:
        return 0, [], []
    return int(ids.shape[-1]), ids.reshape(-1).tolist(), probs.float().reshape(-1).tolist()


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
