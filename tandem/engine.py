"""Generation loops over token ids: the target alone (the baseline) and speculative decoding.

Knows nothing of tokenization or transports. The speculative loop talks to a `Drafter` (propose a block, then learn
the verdict) and a `Verifier` (open a session, verify blocks); `LocalVerifier` runs the target in this process, and
remote verifiers (gRPC, HTTP) implement the same two methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from tandem.errors import ContextOverflowError, InvalidRequestError
from tandem.kv import SequenceState
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams, logits_to_probs, make_generator, sample
from tandem.verify import TokenKind, Verdict, dense_q, verify_greedy, verify_stochastic, verify_tree_greedy

FinishReason = Literal["stop", "length"]
QForm = Literal["full", "sparse", "none"]
OnTokens = Callable[[list[int]], None]


@dataclass(frozen=True)
class Candidate:
    """A continuation verified beside the block's main path: `tokens` follow main token `parent` (-1: they follow
    the committed context, as alternatives to the whole block). Greedy sessions only."""

    parent: int
    tokens: list[int]


@dataclass
class DraftBlock:
    tokens: list[int]  # the main path: the draft model's tokens, maybe lengthened from a phrase pool
    q_full: torch.Tensor | None = None  # [gamma, V]
    q_ids: torch.Tensor | None = None  # [gamma, k] int64
    q_probs: torch.Tensor | None = None  # [gamma, k]
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int
    next_token: int
    kind: TokenKind
    tokens: list[int]  # emitted this round: accepted draft tokens + next token, cut at a stop token or max_tokens
    finish_reason: FinishReason | None
    target_tokens: list[int]  # the target's argmax from the first rejected position to the end of the block
    stale: bool = False  # a block sent ahead that no longer applies: nothing verified, nothing changed
    candidate: int | None = None  # the index of the block's candidate on the accepted path, if any
    # per candidate of the block as sent: the target's argmax after each of its tokens ([] for one not verified)
    candidate_target_tokens: list[list[int]] = field(default_factory=list)


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
    q: torch.Tensor | None  # [gamma, V]; None under greedy
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


def cut_at_finish(
    emitted: list[int], generated: int, total: int, params: SamplingParams, stop_ids: tuple[int, ...], context: int
) -> tuple[list[int], FinishReason | None]:
    """Cut a round's tokens at the first stop token, at max_tokens or at the context end.

    `generated` tokens were emitted before this round; `total` is the sequence length before it.
    """
    room = min(params.max_tokens - generated, context - total)
    out = []
    for tok in emitted[:room]:
        out.append(tok)
        if tok in stop_ids:
            return out, "stop"
    return out, ("length" if len(out) == room else None)


class TargetSession:
    """The target's side of one generation: its KV cache, sampler and progress; verifies drafted blocks."""

    def __init__(self, target: LoadedModel, prompt: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt, target.vocab_size, target.context_length)
        self.target = target
        self.params = params
        self.state = SequenceState(target.model, prompt)
        self.prompt_len = len(prompt)
        self.generator = make_generator(params.seed)
        self.stop_ids = () if params.ignore_eos else tuple(set(params.stop_token_ids) | set(target.eos_token_ids))
        self.finish_reason: FinishReason | None = None
        self.passes = 0

    @property
    def generated(self) -> int:
        return len(self.state.tokens) - self.prompt_len

    def prefill(self) -> None:
        """Cache the prompt (all but its last token) ahead of the first block."""
        if self.state.cached < len(self.state.tokens) - 1:
            self.state.run(self.state.tokens[self.state.cached : -1])
            self.passes += 1

    def align(self, block: DraftBlock, base_len: int) -> DraftBlock | None:
        """The part of a block drafted ahead (its first token at position `base_len`) still to verify; None if stale.

        With L tokens committed, the block applies if it starts at or before L, its first L - base_len tokens are
        the committed ones, and something remains (a block starting at L applies even when empty). Exact even when
        the remainder was drafted on a prefix that was then rejected: the rule is lossless for any q the drafted
        tokens were really sampled from.
        """
        done = len(self.state.tokens) - base_len
        if base_len < 0 or done < 0 or (done > 0 and done >= len(block.tokens)):
            return None
        if block.tokens[:done] != self.state.tokens[base_len:]:
            return None
        return slice_block(block, done, len(block.tokens))

    def verify(self, block: DraftBlock, base_len: int | None = None) -> VerifyResult:
        """`base_len` unset: the block starts at the current position. Set: see `align`; a stale block is answered
        with a stale result and changes nothing (no forward pass)."""
        prepared = self.prepare(block, base_len)
        if isinstance(prepared, VerifyResult):
            return prepared
        return self.finish(prepared, self.forward(prepared))

    def forward(self, prepared: PreparedBlock) -> torch.Tensor:
        """The target's logits for `finish`: [1 + nodes, V] (nodes: the block's tokens, or its tree's nodes)."""
        if prepared.tree is not None:
            return self.state.forward_tree(prepared.tree.parents, prepared.tree.nodes)
        return self.state.forward(prepared.tokens)

    def prepare(self, block: DraftBlock, base_len: int | None = None) -> PreparedBlock | VerifyResult:
        """Every check before the forward pass (a bad block changes nothing); a stale block's result at once.

        Split from `verify` so that a caller can run the forward pass itself (several sessions batched in one):
        feed `state.tokens[state.cached:] + prepared.tokens`, then `finish` with the last len(tokens) + 1 rows. A
        block with candidates (`prepared.tree` set) needs its tree mask and positions: run it with `forward`.
        """
        if base_len is not None:
            current = None if self.finish_reason is not None else self.align(block, base_len)
            if current is None:
                return VerifyResult(0, 0, "recovered", [], self.finish_reason, [], stale=True)
            block = current
        if self.finish_reason is not None:
            raise InvalidRequestError(f"the session has finished ({self.finish_reason})")
        ids = [*block.tokens, *(t for c in block.candidates for t in c.tokens)]
        if any((not isinstance(t, int)) or t < 0 or t >= self.target.vocab_size for t in ids):
            raise InvalidRequestError("the draft has token ids outside the vocabulary")
        if block.candidates and not self.params.greedy:
            # the clean restriction: a tree rule for sampling would need q over every branch
            raise InvalidRequestError("candidates are verified under greedy sampling only (temperature 0)")
        if any(not -1 <= c.parent < len(block.tokens) for c in block.candidates):
            raise InvalidRequestError("a candidate's parent must be -1 or an index into the draft's tokens")
        room = self.target.context_length - len(self.state.tokens) - 1
        # near the context end: verify what fits, drop the rest
        block = slice_block(block, 0, min(len(block.tokens), room), room)
        draft_t = torch.tensor(block.tokens, dtype=torch.long)  # [gamma]
        q = None if self.params.greedy else self._checked_q(draft_t, block)
        return PreparedBlock(block.tokens, draft_t, q, _tree(block) if block.candidates else None)

    def finish(self, prepared: PreparedBlock, logits: torch.Tensor) -> VerifyResult:
        """The verdict from the target's logits over the block ([gamma + 1, V]); commits and rolls the cache back."""
        self.passes += 1
        if prepared.tree is not None:
            return self._finish_tree(prepared, prepared.tree, logits)
        if prepared.q is None:
            verdict = verify_greedy(prepared.draft, logits)
        else:
            verdict = verify_stochastic(prepared.draft, prepared.q, logits_to_probs(logits, self.params),
                                        self.generator)
        return self._commit(prepared.tokens, verdict, logits)

    def _checked_q(self, draft: torch.Tensor, block: DraftBlock) -> torch.Tensor:
        """[gamma, V] q in dense form; raises InvalidRequestError for a q the draft cannot have sampled from."""
        q = dense_q(draft, self.target.vocab_size, block.q_full, block.q_ids, block.q_probs)
        if len(draft) and bool((q[torch.arange(len(draft)), draft] <= 0).any()):
            raise InvalidRequestError("q gives zero probability to a drafted token: the draft cannot have sampled it")
        # the draft's q went through its own copy of the sampling transformation; normalise away rounding
        return q / q.sum(-1, keepdim=True)

    def _finish_tree(self, prepared: PreparedBlock, tree: TreeLayout, logits: torch.Tensor) -> VerifyResult:
        argmax = logits.argmax(-1)  # [1 + nodes]
        tv = verify_tree_greedy(tree.parents, tree.nodes, argmax)
        gamma = len(prepared.tokens)
        on_main = sum(1 for i in tv.path if i < gamma)  # the path is main[:on_main], then maybe one candidate
        taken = None
        if len(tv.path) > on_main:
            taken = next(c for c, (start, n) in enumerate(tree.spans) if start <= tv.path[-1] < start + n)
        accepted = [tree.nodes[i] for i in tv.path]
        before = len(self.state.tokens)
        emitted, finish = cut_at_finish(
            [*accepted, tv.next_token], self.generated, before, self.params, self.stop_ids, self.target.context_length,
        )
        # the cache holds the main path first: keep its accepted part; a candidate's tokens go in uncached
        self.state.commit(emitted, keep_cached=before + min(on_main, len(emitted)))
        self.finish_reason = finish
        rows = argmax.tolist()
        return VerifyResult(
            len(tv.path), tv.next_token, tv.kind, emitted, finish, rows[on_main : gamma + 1], candidate=taken,
            candidate_target_tokens=[rows[start + 1 : start + 1 + n] for start, n in tree.spans],
        )

    def _commit(self, draft: list[int], verdict: Verdict, logits: torch.Tensor) -> VerifyResult:
        n = verdict.num_accepted
        before = len(self.state.tokens)
        emitted, finish = cut_at_finish(
            [*draft[:n], verdict.next_token], self.generated, before, self.params, self.stop_ids,
            self.target.context_length,
        )
        self.state.commit(emitted, keep_cached=before + min(n, len(emitted)))
        self.finish_reason = finish
        target_tokens = logits[n:].argmax(-1).tolist()
        return VerifyResult(n, verdict.next_token, verdict.kind, emitted, finish, target_tokens)

    def close(self) -> None:
        self.state.cache = None  # type: ignore[assignment]


def slice_block(block: DraftBlock, start: int, end: int, room: int | None = None) -> DraftBlock:
    """Tokens [start:end] of a block, with their q rows, and its candidates re-indexed: one branching off before
    `start` (from a token now committed) is emptied, as is any part of one beyond `room` positions. Emptied, not
    removed: a verdict reports on candidates by their index in the block as sent."""
    cut = (lambda t: None if t is None else t[start:end])  # noqa: E731
    cands = []
    for c in block.candidates:
        parent = c.parent - start
        keep = c.tokens if -1 <= parent < end - start else []
        if room is not None:
            keep = keep[: max(0, room - parent - 1)]
        cands.append(Candidate(parent if keep else -1, list(keep)))
    return DraftBlock(block.tokens[start:end], cut(block.q_full), cut(block.q_ids), cut(block.q_probs), cands)


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


class Verifier(Protocol):
    def open(self, prompt: list[int], params: SamplingParams) -> VerifierSession: ...


class VerifierSession(Protocol):
    def verify(self, block: DraftBlock) -> VerifyResult: ...

    def close(self) -> None: ...


class LocalVerifier:
    """The target model in this process."""

    def __init__(self, target: LoadedModel) -> None:
        self.target = target

    def open(self, prompt: list[int], params: SamplingParams) -> TargetSession:
        return TargetSession(self.target, prompt, params)


class Drafter(Protocol):
    def start(self, prompt: list[int], params: SamplingParams) -> None: ...

    def propose(self, gamma: int) -> DraftBlock: ...

    def commit(self, num_accepted: int, emitted: list[int]) -> None: ...


DraftRow = tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None  # sparse (ids [k], probs [k]) | full q [V] | none


def draw_draft_token(
    logits: torch.Tensor,  # [V]
    params: SamplingParams,
    q_form: QForm,
    q_top_k: int,
    generator: torch.Generator,
) -> tuple[int, DraftRow]:
    """The draft's next token, and the q row to send with it: exactly the distribution it was drawn from."""
    if params.greedy:
        return int(logits.argmax()), None
    q = logits_to_probs(logits, params)  # [V]
    if q_form == "sparse":
        top = torch.topk(q, min(q_top_k, q.shape[-1]))
        probs = top.values / top.values.sum()  # the truncated q the draft really samples from
        return int(top.indices[sample(probs, generator)]), (top.indices, probs)
    return sample(q, generator), (q if q_form == "full" else None)


def draft_block(tokens: list[int], rows: list[DraftRow]) -> DraftBlock:
    if not rows or rows[0] is None:
        return DraftBlock(tokens)
    if isinstance(rows[0], tuple):
        return DraftBlock(tokens, q_ids=torch.stack([r[0] for r in rows]), q_probs=torch.stack([r[1] for r in rows]))  # type: ignore[index]
    return DraftBlock(tokens, q_full=torch.stack(rows))  # type: ignore[arg-type]


class ModelDrafter:
    """Drafts with a small causal LM. Under sampling it samples from q and sends q in the chosen form."""

    def __init__(self, draft: LoadedModel, q_form: QForm = "sparse", q_top_k: int = 16) -> None:
        self.draft = draft
        self.q_form = q_form
        self.q_top_k = q_top_k
        self.passes = 0

    def start(self, prompt: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt, self.draft.vocab_size, self.draft.context_length)
        self.params = params
        self.state = SequenceState(self.draft.model, prompt)
        self.generator = make_generator(None if params.seed is None else params.seed + 1)

    def propose(self, gamma: int) -> DraftBlock:
        tokens: list[int] = []
        rows: list[DraftRow] = []
        logits = self.state.forward()[-1] if gamma else None  # [V]
        for i in range(gamma):
            assert logits is not None
            tok, row = draw_draft_token(logits, self.params, self.q_form, self.q_top_k, self.generator)
            tokens.append(tok)
            rows.append(row)
            self.passes += 1
            if i < gamma - 1:
                logits = self.state.run([tok])[-1]
        return draft_block(tokens, rows)

    def commit(self, num_accepted: int, emitted: list[int]) -> None:
        # The draft never saw its own last token when the whole block was accepted: `forward` feeds it next round.
        self.state.commit(emitted, keep_cached=len(self.state.tokens) + min(num_accepted, len(emitted)))


@dataclass
class GenerationStats:
    mode: str
    gamma: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    target_passes: int = 0
    draft_passes: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_target_pass(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d.update(
            acceptance_rate=self.acceptance_rate, mean_acceptance_length=self.mean_acceptance_length,
            tokens_per_target_pass=self.tokens_per_target_pass, tokens_per_s=self.tokens_per_s,
        )
        return d


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: FinishReason
    stats: GenerationStats


def generate_autoregressive(
    target: LoadedModel, prompt: list[int], params: SamplingParams, on_tokens: OnTokens | None = None
) -> GenerationResult:
    """The target alone, one forward pass per token: the baseline every speculative mode must reproduce."""
    t0 = time.perf_counter()
    session = TargetSession(target, prompt, params)
    stats = GenerationStats(mode="ar")
    out: list[int] = []
    while session.finish_reason is None:
        # a zero-length block: verify emits exactly the target's own next token (the "bonus")
        result = session.verify(DraftBlock([]))
        out.extend(result.tokens)
        if on_tokens is not None:
            on_tokens(result.tokens)
        if len(out) == len(result.tokens):
            stats.ttft_s = time.perf_counter() - t0
    stats.target_passes = session.passes
    stats.tokens = len(out)
    stats.wall_s = time.perf_counter() - t0
    session.close()
    assert session.finish_reason is not None
    return GenerationResult(out, session.finish_reason, stats)


def generate_speculative(
    drafter: Drafter,
    verifier: Verifier,
    prompt: list[int],
    params: SamplingParams,
    gamma: int,
    on_tokens: OnTokens | None = None,
) -> GenerationResult:
    if gamma < 0:
        raise InvalidRequestError(f"gamma must be >= 0, got {gamma}")
    t0 = time.perf_counter()
    session = verifier.open(prompt, params)
    drafter.start(prompt, params)
    stats = GenerationStats(mode="spec", gamma=gamma, accepted_per_position=[0] * gamma)
    out: list[int] = []
    finish: FinishReason | None = None
    try:
        while finish is None:
            # 1. draft: never more than the tokens still wanted, less the one the target always adds
            g = min(gamma, params.max_tokens - len(out) - 1)
            block = drafter.propose(max(0, g))
            # 2. verify the block in one target pass
            result = session.verify(block)
            # 3. learn the verdict: roll the draft back to the accepted prefix
            learn = getattr(drafter, "learn", None)  # a drafter that keeps the target's feedback (OuroborosDrafter)
            if learn is not None:
                learn(block, result)
            drafter.commit(result.num_accepted, result.tokens)
            stats.rounds += 1
            stats.drafted += len(block.tokens) + sum(len(c.tokens) for c in block.candidates)
            stats.accepted += result.num_accepted
            per_pos = stats.accepted_per_position
            per_pos.extend([0] * (result.num_accepted - len(per_pos)))  # blocks lengthened beyond gamma
            for i in range(result.num_accepted):
                per_pos[i] += 1
            out.extend(result.tokens)
            if on_tokens is not None and result.tokens:
                on_tokens(result.tokens)
            if stats.rounds == 1:
                stats.ttft_s = time.perf_counter() - t0
            finish = result.finish_reason
    finally:
        session.close()
    stats.target_passes = stats.rounds
    stats.draft_passes = getattr(drafter, "passes", 0)
    stats.tokens = len(out)
    stats.wall_s = time.perf_counter() - t0
    return GenerationResult(out, finish, stats)
