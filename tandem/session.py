"""The target's side of a generation: its KV cache, sampler and progress; verifies drafted blocks.

`TargetSession` checks a block (`prepare`), runs the target over it (`forward`, or the caller batches several
sessions in one pass) and turns the logits into the verdict (`finish`, the rule of `tandem.verify`), committing the
emitted tokens and rolling the cache back to them. `generate_autoregressive` is the target alone, the baseline every
speculative mode must reproduce.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tandem.blocks import (
    Candidate,
    DraftBlock,
    FinishReason,
    TokenLogprob,
    VerifyResult,
    cut_at_finish,
    pending_part,
    slice_block,
)
from tandem.errors import ContextOverflowError, InvalidRequestError, SessionConflictError
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams, logits_to_probs, make_generator
from tandem.shaping import Shaper, line_paths, tree_paths
from tandem.stats import GenerationResult, GenerationStats, OnTokens
from tandem.verify import (
    SparseQ,
    Verdict,
    check_siblings,
    checked_q,
    verify_greedy,
    verify_stochastic,
    verify_tree_greedy,
    verify_tree_stochastic,
)


@dataclass(frozen=True)
class TreeLayout:
    """The nodes of a block with candidates: the main path first (node i = main token i), then each candidate's
    tokens in order. `spans[c]` is candidate c's (first node, length); length 0 for one dropped before the pass."""

    parents: list[int]
    nodes: list[int]
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class PreparedBlock:
    """A block checked and ready for the target's forward pass."""

    tokens: list[int]
    draft: torch.Tensor  # [gamma] int64
    q: SparseQ | None  # per token (with a tree: per node); None: greedy, or a point mass at each drafted token
    tree: TreeLayout | None = None  # set: the forward pass is over a tree (`TargetSession.forward`), not a line


def validate_prompt(prompt: list[int], vocab_size: int, context_length: int) -> None:
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in prompt):
        raise InvalidRequestError(f"the prompt has token ids outside the vocabulary [0, {vocab_size})")
    if len(prompt) >= context_length:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens; the model's context holds {context_length} (prompt + output)"
        )


class TargetSession:
    """The target's side of one generation: its KV cache, sampler and progress; verifies drafted blocks."""

    def __init__(self, target: LoadedModel, prompt: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt, target.vocab_size, target.context_length)
        self.target = target
        self.params = params
        self.state = target.state(prompt)
        self.device = self.state.device
        self.prompt_len = len(prompt)
        self.output_start = max(0, len(prompt) - params.emitted)  # where the output starts (penalties, grammar)
        self.shaper = Shaper(params, target.vocab_size, target.tokenizer, target.eos_token_ids)
        self.generator = make_generator(params.seed, self.device)
        self.stop_ids = () if params.ignore_eos else tuple(set(params.stop_token_ids) | set(target.eos_token_ids))
        self.finish_reason: FinishReason | None = None
        self.passes = 0

    @property
    def generated(self) -> int:
        return len(self.state.tokens) - self.prompt_len

    def prefill(self) -> None:
        """Cache the prompt (all but its last token) ahead of the first block. A resumed context's output so far
        (`params.emitted`) goes in as the exact passes that first computed it would have (`SequenceState.catch_up`)."""
        exact = getattr(self.state, "exact", None)
        # a later tail (a taken candidate's) goes in with the next block, unless every pass must keep one size
        end = len(self.state.tokens) - 1 if exact is not None and exact.fixed else self.output_start - 1
        if self.state.cached < end:
            self.state.catch_up(bulk=self.output_start - 1)
            self.passes += 1

    def align(self, block: DraftBlock, base_len: int) -> DraftBlock | None:
        """The part of a block drafted ahead (its first token at position `base_len`) still to verify; None if stale
        (the rule: `tandem.blocks.pending_part`)."""
        done = pending_part(self.state.tokens, base_len, block.tokens)
        return None if done is None else slice_block(block, done, len(block.tokens))

    def verify(self, block: DraftBlock, base_len: int | None = None) -> VerifyResult:
        """`base_len` unset: the block starts at the current position. Set: see `align`; a stale block is answered
        with a stale result and changes nothing (no forward pass)."""
        prepared = self.prepare(block, base_len)
        if isinstance(prepared, VerifyResult):
            return prepared
        return self.finish(prepared, self.forward(prepared))

    def forward(self, prepared: PreparedBlock) -> torch.Tensor:
        """The target's logits for `finish`: [1 + nodes, V] (nodes: the block's tokens, or its tree's nodes)."""
        if self.state.exact is not None:  # a pass's rows, as every mode computes them: the prompt apart
            self.prefill()
        if prepared.tree is not None:
            return self.state.forward_tree(prepared.tree.parents, prepared.tree.nodes)
        return self.state.forward(prepared.tokens)

    def prepare(self, block: DraftBlock, base_len: int | None = None) -> PreparedBlock | VerifyResult:
        """Every check before the forward pass (a bad block changes nothing); a stale block's result at once.

        Split from `verify` so that a caller can run the forward pass itself (several sessions batched in one):
        feed `state.tokens[state.cached:] + prepared.tokens`, then `finish` with the last len(tokens) + 1 rows. A
        block with candidates (`prepared.tree` set) needs its tree mask and positions (`tandem.batch.forward_batch`
        takes the tree).
        """
        if base_len is not None:
            current = None if self.finish_reason is not None else self.align(block, base_len)
            if current is None:
                return VerifyResult(0, [], self.finish_reason, [], stale=True)
            block = current
        if self.finish_reason is not None:
            raise SessionConflictError(f"the session has finished ({self.finish_reason})")
        ids = [*block.tokens, *(t for c in block.candidates for t in c.tokens)]
        if any((not isinstance(t, int)) or t < 0 or t >= self.target.vocab_size for t in ids):
            raise InvalidRequestError("the draft has token ids outside the vocabulary")
        if not self.params.greedy and any(len(c.tokens) > 1 for c in block.candidates):
            # a sibling shares its main token's q row; a longer branch would need rows of its own
            raise InvalidRequestError("under sampling a candidate is one token beside a main token, drawn from its "
                                      "q without replacement")
        if any(not -1 <= c.parent < len(block.tokens) for c in block.candidates):
            raise InvalidRequestError("a candidate's parent must be -1 or an index into the draft's tokens")
        room = self.target.context_length - len(self.state.tokens) - 1
        # near the context end: verify what fits, drop the rest
        block = slice_block(block, 0, min(len(block.tokens), room), room)
        if not self.params.greedy:  # a sibling whose main token was cut has lost its q row
            block.candidates = [c if c.parent + 1 < len(block.tokens) else Candidate(-1, [])
                                for c in block.candidates]
        draft_t = torch.tensor(block.tokens, dtype=torch.long)  # [gamma]
        q = None if self.params.greedy else checked_q(draft_t, self.target.vocab_size, block.q_ids, block.q_probs)
        if q is not None:
            q = SparseQ(q.ids.to(self.device), q.probs.to(self.device))
        # a llama.cpp target verifies lines: candidates are extra options, and the main line alone is a valid block
        tree = _tree(block) if block.candidates and self.target.backend == "torch" else None
        if tree is not None and not self.params.greedy:  # node i's q: a sibling of main token j has row j
            rows = [i if i < len(block.tokens) else tree.parents[i] + 1 for i in range(len(tree.nodes))]
            q = None if q is None else SparseQ(q.ids[rows], q.probs[rows])
            check_siblings(tree.parents, tree.nodes, q)  # before the pass: a bad block changes nothing
        return PreparedBlock(block.tokens, draft_t.to(self.device), q, tree)

    def finish(self, prepared: PreparedBlock, logits: torch.Tensor) -> VerifyResult:
        """The verdict from the target's logits over the block ([gamma + 1, V]); commits and rolls the cache back."""
        self.passes += 1
        raw = logits
        if prepared.tree is not None:
            logits = self.shaper.shape(logits, self.state.tokens, self.output_start,
                                       tree_paths(prepared.tree.parents, prepared.tree.nodes))
            return self._finish_tree(prepared, prepared.tree, logits, raw)
        logits = self.shaper.shape(logits, self.state.tokens, self.output_start, line_paths(prepared.tokens))
        if self.params.greedy:
            verdict = verify_greedy(prepared.draft, logits)
        else:
            verdict = verify_stochastic(prepared.draft, prepared.q, logits_to_probs(logits, self.params),
                                        self.generator)
        return self._commit(prepared.tokens, verdict, logits, raw)

    def _logprobs(self, raw: torch.Tensor, rows: list[int], tokens: list[int]) -> list[TokenLogprob] | None:
        """The target's log-probabilities of `tokens`, each from its row of the raw logits ([1 + nodes, V])."""
        k = self.params.logprobs
        if k is None or not tokens:
            return None if k is None else []
        lp = raw[rows[: len(tokens)]].float().log_softmax(-1)  # [n, V]
        chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
        top_v, top_i = lp.topk(k, -1)  # [n, k]
        return [TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
                for t, c, i, v in zip(tokens, chosen, top_i.tolist(), top_v.tolist(), strict=True)]

    def _finish_tree(self, prepared: PreparedBlock, tree: TreeLayout, logits: torch.Tensor,
                     raw: torch.Tensor) -> VerifyResult:
        argmax = logits.argmax(-1)  # [1 + nodes]
        if self.params.greedy:
            tv = verify_tree_greedy(tree.parents, tree.nodes, argmax)
        else:
            tv = verify_tree_stochastic(tree.parents, tree.nodes, prepared.q, logits_to_probs(logits, self.params),
                                        self.generator)
        gamma = len(prepared.tokens)
        on_main = sum(1 for i in tv.path if i < gamma)  # the path is main[:on_main], then maybe one candidate
        taken = None
        if len(tv.path) > on_main:
            taken = next(c for c, (start, n) in enumerate(tree.spans) if start <= tv.path[-1] < start + n)
        accepted = [tree.nodes[i] for i in tv.path]
        before = len(self.state.tokens)
        emitted, finish = cut_at_finish(
            [*accepted, tv.next_token], self.generated, before, self.params.max_tokens, self.stop_ids,
            self.target.context_length,
        )
        # the cache holds the main path first: keep its accepted part; a candidate's tokens go in uncached
        self.state.commit(emitted, keep_cached=before + min(on_main, len(emitted)))
        self.finish_reason = finish
        rows = argmax.tolist()
        return VerifyResult(
            len(tv.path), emitted, finish, rows[on_main : gamma + 1], candidate=taken,
            candidate_target_tokens=[rows[start + 1 : start + 1 + n] for start, n in tree.spans],
            logprobs=self._logprobs(raw, [0, *(i + 1 for i in tv.path)], emitted),
        )

    def _commit(self, draft: list[int], verdict: Verdict, logits: torch.Tensor, raw: torch.Tensor) -> VerifyResult:
        n = verdict.num_accepted
        before = len(self.state.tokens)
        emitted, finish = cut_at_finish(
            [*draft[:n], verdict.next_token], self.generated, before, self.params.max_tokens, self.stop_ids,
            self.target.context_length,
        )
        self.state.commit(emitted, keep_cached=before + min(n, len(emitted)))
        self.finish_reason = finish
        target_tokens = logits[n:].argmax(-1).tolist()
        return VerifyResult(n, emitted, finish, target_tokens,
                            logprobs=self._logprobs(raw, list(range(n + 1)), emitted))

    def close(self) -> None:
        self.state.close()


def _tree(block: DraftBlock) -> TreeLayout:
    gamma = len(block.tokens)
    parents, nodes = [*range(-1, gamma - 1)], list(block.tokens)
    spans = []
    for c in block.candidates:
        spans.append((len(nodes), len(c.tokens)))
        for i, tok in enumerate(c.tokens):
            parents.append(c.parent if i == 0 else len(nodes) - 1)
            nodes.append(tok)
    return TreeLayout(parents, nodes, spans)


def generate_autoregressive(
    target: LoadedModel, prompt: list[int], params: SamplingParams, on_tokens: OnTokens | None = None
) -> GenerationResult:
    """The target alone, one forward pass per token: the baseline every speculative mode must reproduce."""
    t0 = time.perf_counter()
    session = TargetSession(target, prompt, params)
    stats = GenerationStats(mode="ar")
    out: list[int] = []
    logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
    while session.finish_reason is None:
        # a zero-length block: verify emits exactly the target's own next token (the "bonus")
        result = session.verify(DraftBlock([]))
        out.extend(result.tokens)
        if logprobs is not None:
            logprobs.extend(result.logprobs or [])
        if on_tokens is not None:
            on_tokens(result.tokens)
        if len(out) == len(result.tokens):
            stats.ttft_s = time.perf_counter() - t0
    stats.target_passes = session.passes
    stats.tokens = len(out)
    stats.wall_s = time.perf_counter() - t0
    session.close()
    assert session.finish_reason is not None
    return GenerationResult(out, session.finish_reason, stats, logprobs)
