"""The drafter seam and the draft-model drafter.

A `Drafter` proposes a block continuing a context (which may run ahead of what the target has committed: a block
drafted while the previous one is being verified) and learns each verdict. `ModelDrafter` drafts with a small causal
LM, its blocks grown into trees (`tandem.tree`) with a phrase pool's chains. The speculative loop (`tandem.speculate`)
uses it in process and on the edge alike.

Under sampling the draft samples from q and sends q in the chosen form: exactly the distribution it drew from.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams, logits_to_probs, make_generator, sample
from tandem.shaping import Shaper
from tandem.tree import PoolBranches, Tree, calibrate, grow
from tandem.value import BlockValue, Calibration

QForm = Literal["sparse", "none"]  # q sent as its top-k support (k = V: all of it), or not (point masses)
DraftRow = tuple[torch.Tensor, torch.Tensor] | None  # (ids [k], probs [k]) | none


class Drafter(Protocol):
    @property
    def draft(self) -> LoadedModel: ...

    @property
    def steps(self) -> int:
        """Draft-model passes run so far."""

    def start(self, context: list[int], params: SamplingParams) -> None:
        """A new session over `context` (a new generation, or a resume)."""

    def propose(self, context: list[int], n: int, room: int | None = None, at_least: int = 1) -> DraftBlock:
        """A block continuing `context` from `n` draft-model passes; `room`: block tokens allowed in all. A drafter
        may end a block early where it is unsure, after `at_least` tokens (a block sent ahead: its guessed bonus
        and one more)."""

    def learn(self, context: list[int], block: DraftBlock, result: VerifyResult, skipped: int = 0) -> None:
        """The verdict on `block` as proposed, whose first `skipped` tokens were committed before it was verified
        (a block sent ahead); `context`: the committed sequence before the rest."""


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
    if q_form == "none":
        return sample(q, generator), None
    top = torch.topk(q, min(q_top_k, q.shape[-1]))
    probs = top.values / top.values.sum()  # the truncated q the draft really samples from
    return int(top.indices[sample(probs, generator)]), (top.indices, probs)


def draft_block(tokens: list[int], rows: list[DraftRow]) -> DraftBlock:
    """The block as it goes on the wire: q rows on the CPU, wherever the draft ran."""
    pairs = [r for r in rows if r is not None]
    if not pairs:
        return DraftBlock(tokens)
    return DraftBlock(tokens, q_ids=torch.stack([r[0] for r in pairs]).cpu(),
                      q_probs=torch.stack([r[1] for r in pairs]).cpu())


class ModelDrafter:
    """Drafts with a small causal LM over one growing context; `reset` moves it to another context, keeping the
    cache over the common prefix (one crop). Where a block ends early (after `at_least` tokens), by the draft's
    confidence in its next token (its most likely token's probability, under the request's sampling): `value` given,
    where that token is not worth its cost (`tandem.value`, calibrated by the verdicts `learn` sees); else before a
    token under `p_min` (llama.cpp's draft p-min). `cut` counts the blocks it ended. `tree` (by value): siblings
    beside the chain where they pay (`tandem.tree`): the draft's second choices (greedy) or draws without
    replacement from the main token's q (sampling), placed by the second choice's odds; with `pool` (no grammar), a
    phrase pool's chains in the same tree (sampling: only the chain's lengthening), fed the prompt and every
    verdict."""

    def __init__(self, draft: LoadedModel, q_form: QForm = "sparse", q_top_k: int = 16, p_min: float = 0.0,
                 value: BlockValue | None = None, tree: bool = False, pool: PoolBranches | None = None) -> None:
        self.draft, self.q_form, self.q_top_k, self.p_min, self.value = draft, q_form, q_top_k, p_min, value
        self.tree, self.pool = tree, pool
        self.phrases: PoolBranches | None = None  # the pool, for the request `start` began
        self.branches = {True: Calibration(), False: Calibration()}  # by greedy: siblings' acceptance by q2 / (1 - q1)
        self.branch = self.branches[True]
        self.steps = self.cut = 0

    def start(self, context: list[int], params: SamplingParams) -> None:
        self.params = params
        # q goes through the same shaping as p: penalties, bias and the grammar follow the drafted tokens too
        self.shaper = Shaper(params, self.draft.vocab_size, self.draft.tokenizer, self.draft.eos_token_ids)
        self.output_start = max(0, len(context) - params.emitted)
        self.state = self.draft.state(context)
        self.state.catch_up()  # the prompt's prefill, here: the loop runs it while the cloud prefills too
        self.generator = make_generator(None if params.seed is None else params.seed + 1, self.state.device)
        # a seeded sample is reproducible only if its blocks are: the value rule reads timings, the floor does not
        self.sizer = self.value if params.greedy or params.seed is None else None
        self.branch = self.branches[params.greedy]
        self.phrases = self.pool if self.tree and params.grammar is None else None
        if self.phrases is not None:
            self.phrases.pool.feed(context)

    def reset(self, context: list[int]) -> None:
        common = 0
        for a, b in zip(self.state.tokens, context, strict=False):
            if a != b:
                break
            common += 1
        self.state.tokens = list(context)
        self.state.rollback(min(self.state.cached, common))

    def propose(self, context: list[int], n: int, room: int | None = None, at_least: int = 1) -> DraftBlock:
        self.reset(context)
        return self.draft_tokens(n, at_least, room)

    def draft_tokens(self, n: int, at_least: int = 1, room: int | None = None) -> DraftBlock:
        """n tokens continuing the current context, which grows by them; fewer, but `at_least`, where the draft is
        unsure (`p_min`). `room`: block tokens allowed in all, a tree's included (default: n)."""
        # the tokens before the block, as far back as the pool's keys reach (none without a pool)
        before = self.state.tokens[-self.phrases.pool.key_len :] if self.phrases is not None else None
        tokens: list[int] = []
        rows: list[DraftRow] = []
        confidence: list[float] = []
        alternatives: list[tuple[int, float]] = []  # per token: the draft's second choice, q2 / (1 - q1)
        laws: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # under sampling, with a tree: token i's q
        if self.sizer is not None:
            self.sizer.start()
        while len(tokens) < n:
            # tokens the grammar forces need no draft step: the draft "samples" them with certainty, so their q
            # rows are point masses, and the target, under the same mask, can only accept them
            forced = self.shaper.forced(self.state.tokens, self.output_start)[: n - len(tokens)]
            if forced:
                tokens += forced
                rows += [self._certain(t) for t in forced]
                confidence += [1.0] * len(forced)
                alternatives += [(0, 0.0)] * len(forced)
                self.state.tokens += forced
                for _ in forced:
                    self._take(1.0)
                continue
            # a block accepted whole: the draft never saw its own last token; `forward` feeds it here
            logits = self.state.forward()[-1]  # [V]
            if self.shaper.active:
                logits = self.shaper.shape(logits[None], self.state.tokens, self.output_start, [[]])[0]
            self.steps += 1
            sure, alt = self._top2(logits) if self.value is not None or self.p_min > 0 else (1.0, (0, 0.0))
            if len(tokens) >= at_least and not self._worth(sure):
                # the block ends here. The step is not lost: its cache entry (the last token) is kept
                self.cut += 1
                break
            tok, row = draw_draft_token(logits, self.params, self.q_form, self.q_top_k, self.generator)
            if self.tree and not self.params.greedy:
                laws[len(tokens)] = row or (torch.arange(logits.shape[-1]), logits_to_probs(logits, self.params))
                if 1 - sure < 1e-6 or (row is not None and len(row[0]) < 2):  # nothing left to draw a sibling from
                    alt = (0, 0.0)
            tokens.append(tok)
            rows.append(row)
            confidence.append(sure)
            alternatives.append(alt)
            self._take(sure)
            self.state.tokens.append(tok)
        tree = Tree()
        if self.tree and self.sizer is not None:
            tree = grow(self.sizer, self.branch, confidence, alternatives, self.phrases, before, tokens,
                        max(n, room or 0), self.params.greedy)
            if not self.params.greedy:  # chosen by q alone, then drawn, as `verify_tree_stochastic` takes them
                tree.candidates = [Candidate(c.parent, [self._draw_sibling(laws[c.parent + 1], tokens[c.parent + 1])])
                                   for c in tree.candidates]
        # a pool's tokens go with point-mass rows: the pool chose them deterministically from the tokens before them
        block = draft_block(tokens + tree.lengthen, rows + [self._certain(t) for t in tree.lengthen])
        block.confidence, block.alternatives = confidence, alternatives
        block.candidates, block.branch_confidence = tree.candidates, tree.branch_confidence
        if tree.lengthen:
            block.sources = ["draft"] * len(tokens) + ["pool"] * len(tree.lengthen)
            self.state.tokens += tree.lengthen
        return block

    def _draw_sibling(self, law: tuple[torch.Tensor, torch.Tensor], main: int) -> int:
        """A draw from the q the main token was drawn from, less that token (sampling without replacement)."""
        ids, probs = law  # [k], [k]
        left = probs.masked_fill(ids == main, 0)
        return int(ids[sample(left / left.sum(), self.generator)])

    def _worth(self, confidence: float) -> bool:
        return self.sizer.worth(confidence) if self.sizer is not None else confidence >= self.p_min

    def _take(self, confidence: float) -> None:
        if self.sizer is not None:
            self.sizer.take(confidence)

    def _top2(self, logits: torch.Tensor) -> tuple[float, tuple[int, float]]:
        """The draft's top probability ([V] logits; temperature 1 under greedy), its second choice, q2 / (1 - q1)."""
        probs = torch.softmax(logits.float(), -1) if self.params.greedy else logits_to_probs(logits, self.params)
        top = torch.topk(probs, 2)
        q1, q2 = float(top.values[0]), float(top.values[1])
        return q1, (int(top.indices[1]), q2 / (1 - q1) if q1 < 1 else 0.0)

    def _certain(self, token: int) -> DraftRow:
        """The q row of a token drawn with probability 1, in this drafter's form."""
        if self.params.greedy or self.q_form == "none":
            return None
        v, dev = self.draft.vocab_size, self.state.device
        k = min(self.q_top_k, v)
        ids = (token + torch.arange(k, device=dev)) % v  # [k] the token, then distinct ids at probability 0
        return ids, torch.nn.functional.one_hot(torch.tensor(0, device=dev), k).float()

    def learn(self, context: list[int], block: DraftBlock, result: VerifyResult, skipped: int = 0) -> None:
        """The verdict calibrates the draft's confidence and its siblings'; the next `propose` rolls the cache back
        to what was emitted."""
        if self.value is not None:
            calibrate(self.value.calibration, self.branch, block, result, skipped)
        if self.phrases is not None:
            self.phrases.learn(context, block, result, skipped, self.params.greedy)
