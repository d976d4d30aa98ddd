"""The Ouroboros drafter: the draft model's block lengthened from a phrase pool (`tandem.pool`), with candidate
branches, every verdict learnt into the pool; and the counts of drafted and accepted tokens by where they came from.

Block shapes: by default the config's fixed budgets (`OuroborosConfig.extend`, `candidates`, `candidate_len`). Given
a `CostCurve` (`costs`), the block is built to those budgets and then cut to the shape with the most expected tokens
per second (`tandem.costs.keep_nodes`): each pool token or candidate token kept costs a position in the target's
pass and adds what its measured acceptance (`ShapeStats`, learnt from verdicts) says it will. Only the shape changes:
what is sent is still a prefix of the block the fixed budgets would send, so losslessness is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tandem.blocks import Candidate, DraftBlock, VerifyResult, slice_block
from tandem.costs import Acceptance, CostCurve, keep_nodes
from tandem.drafting import ModelDrafter, QForm
from tandem.models import LoadedModel
from tandem.pool import ORIGINS, BlockOrigins, OuroborosConfig, PhrasePool, draft_greedy, learn, ouroboros_block
from tandem.sampling import SamplingParams

SOURCES = ("draft", "vetted", "pool", "candidate")


@dataclass
class SourceCounts:
    """Drafted and accepted tokens by where they came from: a draft-model step ("draft"); a pool phrase the draft
    model read and agreed with in the same pass ("vetted": its own greedy tokens, without a step each); the pool
    alone lengthening the main path ("pool"); a candidate branch ("candidate").

    The pool's tokens ("vetted", "pool", "candidate") are counted by their phrase's origin too ("prompt", "output",
    "feedback"; see `PhrasePool`): per origin sums to those three sources together."""

    drafted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    accepted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    drafted_by_origin: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ORIGINS, 0))
    accepted_by_origin: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ORIGINS, 0))

    def merge(self, other: SourceCounts) -> None:
        """Add another run's counts to these."""
        for mine, theirs in ((self.drafted, other.drafted), (self.accepted, other.accepted),
                             (self.drafted_by_origin, other.drafted_by_origin),
                             (self.accepted_by_origin, other.accepted_by_origin)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


@dataclass
class ShapeStats:
    """Per position, the chance a token is accepted once reached, measured from verdicts: the block's own tokens
    (the draft model's, vetted ones included); the pool's lengthening after them; a candidate branch's tokens, once
    its branch point was reached and the main path's next token rejected (or the main path ended there)."""

    main: Acceptance = field(default_factory=lambda: Acceptance(0.6))
    pool: Acceptance = field(default_factory=lambda: Acceptance(0.5))
    candidate: Acceptance = field(default_factory=lambda: Acceptance(0.3))

    def learn(self, block: DraftBlock, own: int, on_main: int, result: VerifyResult) -> None:
        """`block`: as verified; its first `own` tokens the draft model's, the rest the pool's; `on_main`: its main
        tokens on the accepted path."""
        self.main.observe(own, min(on_main, own))
        if on_main >= own and len(block.tokens) > own:
            self.pool.observe(len(block.tokens) - own, on_main - own)
        for c, outs in zip(block.candidates, result.candidate_target_tokens, strict=False):
            if not c.tokens or c.parent + 1 != on_main:
                continue  # not reached, or the main path's own token was accepted there (the candidate's differs)
            m = int(bool(result.target_tokens) and result.target_tokens[0] == c.tokens[0])
            while m and m < len(c.tokens) and m <= len(outs) and outs[m - 1] == c.tokens[m]:
                m += 1
            self.candidate.observe(len(c.tokens), m)

    def chains(self, block: DraftBlock, own: int) -> tuple[float, list[list[float]]]:
        """The block's first `own` tokens' expected accepted tokens (+ the target's one), and per optional chain
        (the pool's lengthening, then each candidate) what each of its tokens adds."""
        reach = self.main.gains(own)
        at_end = reach[-1] if own else 1.0
        chains = [self.pool.gains(len(block.tokens) - own, at_end)]
        for c in block.candidates:
            nxt = c.parent + 1  # the main path's token this candidate is an alternative to
            here = 1.0 if c.parent < 0 else reach[c.parent] if c.parent < own else 0.0
            missed = 1.0 if nxt >= len(block.tokens) else 1 - (self.main(nxt) if nxt < own else self.pool(0))
            chains.append(self.candidate.gains(len(c.tokens), here * missed))
        return 1 + sum(reach), chains


class OuroborosDrafter:
    """A `Drafter`: the draft model's block lengthened from a phrase pool, with candidate branches; learns verdicts.

    Pass a pool kept across requests for a warm start. `sources` counts drafted and accepted tokens by where they
    came from. `costs`: the target's pass time by positions (share `AdaptiveGamma.costs`, which the loop feeds);
    given, blocks are cut to the shape that pays (`cfg`'s budgets as the most); None: `cfg`'s budgets as they are.
    `overhead_s`: seconds a round costs besides drafting and the pass (e.g. a round trip), for the loop to keep
    current; more of it makes longer blocks pay. Every `explore_every`-th block (0: never) keeps at least the first
    token of each pool chain, so that acceptance measured low is measured again.
    """

    def __init__(self, draft: LoadedModel, pool: PhrasePool | None = None, cfg: OuroborosConfig | None = None,
                 q_form: QForm = "sparse", q_top_k: int = 16, costs: CostCurve | None = None,
                 overhead_s: float = 0.0, p_min: float = 0.0) -> None:
        self.inner = ModelDrafter(draft, q_form, q_top_k, p_min)
        self.pool = pool if pool is not None else PhrasePool()
        self.cfg = cfg or OuroborosConfig()
        self.sources = SourceCounts()
        self.costs = costs
        self.overhead_s = overhead_s
        self.explore_every = 16
        self.shape = ShapeStats()
        self._blocks = 0
        # per block in flight (by identity): each main-path token's source, and the pool tokens' phrase origins
        self._proposed: dict[int, tuple[list[str], BlockOrigins]] = {}
        self._seeded = False

    @property
    def steps(self) -> int:
        return self.inner.steps

    @property
    def draft(self) -> LoadedModel:
        return self.inner.draft

    def start(self, context: list[int], params: SamplingParams) -> None:
        self.inner.start(context, params)
        self.params = params
        if self.cfg.seed_prompt and not self._seeded:  # a resume's context is mostly fed already
            self.pool.feed(context, origin="prompt")
        self._seeded = True

    def propose(self, context: list[int], n: int, room: int | None = None, at_least: int = 1) -> DraftBlock:
        room = max(n, self.cfg.max_draft if room is None else room)
        self.inner.reset(context)
        parted: list[Candidate] = []
        tags = BlockOrigins()
        t0 = time.perf_counter()
        # shaped logits (penalties, bias, grammar): the draft model's own steps, each shaped; no pool phrases vetted
        if self.params.greedy and n and not self.params.shaped:
            limit = min(max(n, self.cfg.max_draft), room)
            tokens, origin, parted, passes = draft_greedy(self.inner.state, self.pool, n, limit, tags)
            self.inner.state.tokens.extend(tokens)
            self.inner.steps += passes
            block = DraftBlock(tokens)
        else:
            block = self.inner.draft_tokens(n, at_least)
            origin = ["draft"] * len(block.tokens)
        spent = time.perf_counter() - t0
        if self.params.grammar is None:  # under a grammar the draft proposes only what it allows: no pool tokens
            block = ouroboros_block(self.pool, context, block, parted, self.cfg, self.params.greedy, room,
                                    self.inner.draft.vocab_size, tags)
        if self.costs is not None:
            block = self._cut(block, len(origin), spent + self.overhead_s, tags)
        origin = origin + ["pool"] * (len(block.tokens) - len(origin))
        block.sources = origin
        self._proposed[id(block)] = (origin, tags)
        while len(self._proposed) > 8:  # blocks never learnt (stale, or a session that ended): forget the oldest
            del self._proposed[next(iter(self._proposed))]
        for src in origin:
            self.sources.drafted[src] += 1
        self.sources.drafted["candidate"] += sum(len(c.tokens) for c in block.candidates)
        for o in tags.main:
            if o is not None:
                self.sources.drafted_by_origin[o] += 1
        for c, o in zip(block.candidates, tags.candidates, strict=True):
            self.sources.drafted_by_origin[o] += len(c.tokens)
        return block

    def learn(self, context: list[int], block: DraftBlock, result: VerifyResult, skipped: int = 0) -> None:
        """The verdict's lessons for the pool, and the per-source counts. `block`: as proposed; `skipped`: its
        leading tokens committed before it was verified (a block sent ahead); `context`: the sequence before the
        rest."""
        aligned = slice_block(block, skipped, len(block.tokens)) if skipped else block
        learn(self.pool, context, aligned, result)
        origin, tags = self._proposed.pop(id(block), ([], BlockOrigins()))
        if result.stale:
            return
        n = result.num_accepted
        on_main = n if result.candidate is None else aligned.candidates[result.candidate].parent + 1
        if origin:
            self.shape.learn(aligned, sum(src != "pool" for src in origin[skipped:]), on_main, result)
        for src in origin[skipped : skipped + on_main]:
            self.sources.accepted[src] += 1
        self.sources.accepted["candidate"] += n - on_main
        for o in tags.main[skipped : skipped + on_main]:
            if o is not None:
                self.sources.accepted_by_origin[o] += 1
        if result.candidate is not None and n > on_main and result.candidate < len(tags.candidates):
            self.sources.accepted_by_origin[tags.candidates[result.candidate]] += n - on_main

    def _cut(self, block: DraftBlock, own: int, fixed_s: float, tags: BlockOrigins) -> DraftBlock:
        """The block cut to the shape with the most expected tokens per second: its first `own` tokens (the draft
        model's) kept, of the pool's lengthening and of each candidate a prefix; `tags` cut alike."""
        assert self.costs is not None
        tokens, chains = self.shape.chains(block, own)
        keep = keep_nodes(self.costs, fixed_s, own + 1, tokens, chains)
        if self.explore_every and self._blocks % self.explore_every == 0:
            keep = [max(k, min(1, len(c))) for k, c in zip(keep, chains, strict=True)]
        self._blocks += 1
        out = slice_block(block, 0, own + keep[0])
        out.candidates = [Candidate(c.parent, c.tokens[:k]) for c, k in zip(block.candidates, keep[1:], strict=True)
                          if k]
        tags.main = tags.main[: len(out.tokens)]
        tags.candidates = [o for o, k in zip(tags.candidates, keep[1:], strict=True) if k]
        return out
