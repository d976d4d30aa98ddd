"""The Ouroboros drafter: the draft model's block lengthened from a phrase pool (`tandem.pool`), with candidate
branches, every verdict learnt into the pool; and the counts of drafted and accepted tokens by where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.blocks import Candidate, DraftBlock, VerifyResult, slice_block
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



class OuroborosDrafter:
    """A `Drafter`: the draft model's block lengthened from a phrase pool, with candidate branches; learns verdicts.

    Pass a pool kept across requests for a warm start. `sources` counts drafted and accepted tokens by where they
    came from.
    """

    def __init__(self, draft: LoadedModel, pool: PhrasePool | None = None, cfg: OuroborosConfig | None = None,
                 q_form: QForm = "sparse", q_top_k: int = 16) -> None:
        self.inner = ModelDrafter(draft, q_form, q_top_k)
        self.pool = pool if pool is not None else PhrasePool()
        self.cfg = cfg or OuroborosConfig()
        self.sources = SourceCounts()
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

    def propose(self, context: list[int], n: int, room: int | None = None) -> DraftBlock:
        room = max(n, self.cfg.max_draft if room is None else room)
        self.inner.reset(context)
        parted: list[Candidate] = []
        tags = BlockOrigins()
        if self.params.greedy and n:
            limit = min(max(n, self.cfg.max_draft), room)
            tokens, origin, parted, passes = draft_greedy(self.inner.state, self.pool, n, limit, tags)
            self.inner.state.tokens.extend(tokens)
            self.inner.steps += passes
            block = DraftBlock(tokens)
        else:
            block = self.inner.draft_tokens(n)
            origin = ["draft"] * len(block.tokens)
        block = ouroboros_block(self.pool, context, block, parted, self.cfg, self.params.greedy, room,
                                self.inner.draft.vocab_size, tags)
        origin = origin + ["pool"] * (len(block.tokens) - len(origin))
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
        for src in origin[skipped : skipped + on_main]:
            self.sources.accepted[src] += 1
        self.sources.accepted["candidate"] += n - on_main
        for o in tags.main[skipped : skipped + on_main]:
            if o is not None:
                self.sources.accepted_by_origin[o] += 1
        if result.candidate is not None and n > on_main and result.candidate < len(tags.candidates):
            self.sources.accepted_by_origin[tags.candidates[result.candidate]] += n - on_main
